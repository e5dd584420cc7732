"""fastbert inside Hugging Face transformers (>= 5, < 6) BERT-family and ModernBERT models.

Two lines turn an existing transformers BERT script into a fastbert one::

    from fastbert.integrations.transformers import patch
    model = patch(BertForSequenceClassification.from_pretrained(path))   # in place

or, attention only::

    from fastbert.integrations.transformers import register
    register()
    model = BertModel.from_pretrained(path, attn_implementation="fastbert")

What runs where
---------------
- Self- and cross-attention: transformers calls ``attention_interface(module, query, key, value,
  attention_mask, dropout=, scaling=, **kwargs)`` with q/k/v ``(batch, num_heads, seqlen,
  head_dim)``. :func:`fastbert_attention_forward` hands strided ``(batch, seqlen, num_heads,
  head_dim)`` views of them (no copies) to :func:`fastbert.ops.attention`.
- Masks: transformers builds the mask with the function registered under the same name in its
  ``AttentionMaskInterface``; an implementation registered without one receives **no mask at
  all**. :func:`fastbert_mask` hands over the 2-D padding mask ``(batch, seqlen_k)`` (True =
  attend) for bidirectional attention, as transformers' own flash-attention mask function does;
  any other pattern (a causal decoder, packed sequences, custom overlays) becomes a 4-D boolean
  mask that the attention function applies as an additive ``-inf`` bias.
- :func:`patch` replaces the forward of the model's encoder (``BertEncoder`` / ``RobertaEncoder``
  / ``ElectraEncoder`` / ... and DistilBERT's ``Transformer``) with fastbert's unpadded encoder
  (:class:`fastbert.nn.Encoder`, the one the models in :mod:`fastbert.models` run) driven over the
  transformers layers' own modules: the real tokens are packed once per forward, every layer runs
  on ``(total_tokens, hidden)`` with varlen attention and the fused add & norm and bias + GELU
  (:mod:`fastbert.nn.bert`), and the result is scattered back once, with zeros at padding
  positions (transformers computes padded rows; compare real tokens). A batch without padding
  runs as is. Hidden states and attentions (``output_*`` in the call or in the config) go to
  transformers' output collector, as its hooks would. (transformers accepts
  ``config.output_attentions = True`` only with ``attn_implementation="eager"``: after patch() set
  it in the call; a config flag set before patch() works but must be False for ``save_pretrained``.) Decoders (causal masks, cross-attention,
  a cache) keep transformers' layer loop, over add & norm (``*SelfOutput``, ``*Output``) and
  intermediate blocks whose forwards are rerouted to the same fused ops. Module names,
  parameters and state_dict keys do not change.
- ``output_attentions`` needs the attention probabilities, which the fused kernels never
  materialise: they are computed beside the fused attention from the same q and k
  (:func:`fastbert.nn.attention_probs`; :func:`attention_probs_forward` on the decoder path).
  Everything stays differentiable, including w.r.t. ``inputs_embeds`` (attribution).
- ModernBERT (``ModernBertModel`` and its heads): the model's forward runs transformers'
  embeddings, then the same unpadded encoder over :mod:`fastbert.nn.modernbert`'s pre-norm blocks
  on the transformers layers' weights: rotary (:func:`fastbert.ops.rotary`), varlen attention,
  global or with ``window=(local_attention // 2,) * 2`` per ``config.layer_types``, GeGLU
  (:func:`fastbert.ops.geglu`), fastbert LayerNorms (:mod:`fastbert.integrations._hf.modernbert`).
- Pooling at position 0 (BERT's ``pooler_output``, ModernBERT's ``classifier_pooling="cls"``) of a
  row whose position 0 is padding (left padding, an all-padding row) reads the zeros the unpadded
  encoder writes there, e.g. ``pooler_output = tanh(pooler.dense.bias)``; transformers reads the
  hidden state it computed for that padding token. Both are functions of padding only; matching
  transformers would mean carrying every padding row 0 through every layer as an extra query, so
  fastbert does not: pool a real token (right padding) or use ``"mean"`` pooling.
- The mask: a 2-D ``attention_mask`` is checked at the patched model's entry (a forward pre-hook)
  as fastbert's own models check it, so an additive mask (0 / -10000 / -inf) raises instead of
  being inverted by transformers' bool conversion; values are read for CPU tensors only (on CUDA
  dtype and shape are checked, no host sync; ``FASTBERT_CHECK_INPUTS=1`` reads them there too).

Layout: this module is the public face (:func:`patch`, :func:`unpatch`, :func:`register`, ...);
the pieces live in :mod:`fastbert.integrations._hf`: ``attention`` (the attention / mask
interfaces), ``encoder`` (the shared unpadded route and the mask check), ``bert``, ``modernbert``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastbert.integrations._hf import bert as _bert
from fastbert.integrations._hf import modernbert as _modernbert
from fastbert.integrations._hf.attention import (ATTN_IMPLEMENTATION, _hf, attention_probs_forward,
                                                 fastbert_attention_forward, fastbert_mask, packed_sequences,
                                                 register)
from fastbert.integrations._hf.bert import HIDDEN_ACT_TO_APPROXIMATE
from fastbert.integrations._hf.encoder import PatchedForward, check_mask_hook
from fastbert.ops import check_backend

# Instance attributes patch() sets (unpatch() deletes them where present).
_PATCH_ATTRS = ("forward", "_fastbert_backend", "_fastbert_approximate", "_fastbert_encoder", "backend",
                "approximate", "act_fn")


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has rewired ``model`` (and :func:`unpatch` has not undone it)."""
    return getattr(model, "_fastbert_patch_state", None) is not None


def patch(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Rewire a transformers BERT-family or ModernBERT model in place to run fastbert's unpadded
    fused encoder.

    The base models and every head of BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA and
    DistilBERT (tested), and any model with BERT's block layout (an ``*Encoder`` whose layers hold
    ``attention.self.{query,key,value}`` / ``attention.output`` / ``intermediate`` / ``output``);
    ModernBERT's ``ModernBertModel``, ``ForMaskedLM``, ``ForSequenceClassification`` and
    ``ForTokenClassification`` (tested; any model holding a ``ModernBertModel``). The encoder's
    forward becomes fastbert's unpadded :class:`fastbert.nn.Encoder` over the layers' own
    parameters (see the module docstring). BERT's attention switches to
    ``attn_implementation="fastbert"`` (see :func:`register`); ModernBERT keeps its own for the
    calls its patched forward hands back (a mask that is not 2-D). For the decoder path the add &
    norm blocks run ``layer_norm(dense_nobias(h), x_bias=dense.bias, residual=input,
    dropout_p=...)``; the intermediate block runs ``gelu(dense_nobias(h), bias=dense.bias)`` when
    ``config.hidden_act`` maps to fastbert's GELU (``gelu``, ``gelu_python`` -> erf; ``gelu_new``,
    ``gelu_pytorch_tanh``, ``gelu_fast``, ``gelu_accurate`` -> tanh) and keeps Hugging Face's
    activation otherwise. Submodule names, parameters, state_dict keys, ``output_attentions``
    (in the call; on the config within transformers' limits, see the module docstring),
    gradient checkpointing, ``save_pretrained`` (transformers does not write the attention
    implementation into ``config.json``, so the checkpoint loads in plain transformers) and
    pickling (``torch.save`` / ``torch.load``, also in a fresh process) keep working. Patching a patched model is a no-op. The attention implementation is set
    through transformers' ``set_attn_implementation``, i.e. on ``model.config``: another model
    built from the same config object (``BertModel(config)`` twice) runs fastbert's attention too
    (its other blocks stay Hugging Face's); give each model its own config to keep one plain.

    Args:
        model: a transformers ``PreTrainedModel`` of the BERT family or ModernBERT.
        backend: force a fastbert backend for every op (``"torch"``, ``"triton"``, ...); else
            ``FASTBERT_BACKEND``, else automatic. Checked here (:func:`fastbert.ops.check_backend`).

    Returns:
        ``model`` (patched in place).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``; ``backend`` is not a str.
        ValueError: ``backend`` names no registered backend; no BERT-family encoder, attention /
            add & norm block or ModernBERT model was found in ``model``; at a forward, a 2-D
            ``attention_mask`` with values other than 0 / 1 (see the module docstring).
        NotImplementedError: a ModernBERT ``rope_type`` other than ``"default"``.
    """
    transformers = _hf()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        return model
    check_backend(backend)
    previous = model.config._attn_implementation
    modernbert = _modernbert.modernbert_models(model)
    if modernbert:
        _modernbert.patch_modernbert(modernbert, backend)
    else:
        _bert.patch_bert(model, backend)
    hook = model.register_forward_pre_hook(check_mask_hook, with_kwargs=True)
    model._fastbert_patch_state = {"attn_implementation": previous, "hook": hook}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: class forwards, the previous attention implementation and the plain
    mask handling come back. Returns ``model``; a model that is not patched is returned unchanged.
    """
    state = getattr(model, "_fastbert_patch_state", None)
    if state is None:
        return model
    for m in model.modules():
        if not any(a in m.__dict__ for a in ("_fastbert_backend", "_fastbert_encoder")):
            continue
        for attr in _PATCH_ATTRS:
            if attr in m.__dict__ and (attr != "forward" or isinstance(m.__dict__[attr], PatchedForward)):
                delattr(m, attr)
    if model.config._attn_implementation != state["attn_implementation"]:
        model.set_attn_implementation(state["attn_implementation"])
    state["hook"].remove()
    del model._fastbert_patch_state
    return model


__all__ = ["ATTN_IMPLEMENTATION", "HIDDEN_ACT_TO_APPROXIMATE", "attention_probs_forward",
           "fastbert_attention_forward", "fastbert_mask", "is_patched", "packed_sequences", "patch",
           "register", "unpatch"]
