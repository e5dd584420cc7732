"""fastbert inside Hugging Face transformers (>= 5, < 6) BERT-family models.

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
  transformers' output collector, as its hooks would. Decoders (causal masks, cross-attention,
  a cache) keep transformers' layer loop, over add & norm (``*SelfOutput``, ``*Output``) and
  intermediate blocks whose forwards are rerouted to the same fused ops. Module names,
  parameters and state_dict keys do not change.
- ``output_attentions`` needs the attention probabilities, which the fused kernels never
  materialise: they are computed beside the fused attention from the same q and k
  (:func:`fastbert.nn.attention_probs`; :func:`attention_probs_forward` on the decoder path).
  Everything stays differentiable, including w.r.t. ``inputs_embeds`` (attribution).
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.nn.bert import _dense_act, _dense_add_norm, self_attention
from fastbert.nn.encoder import Encoder
from fastbert.ops import attention

ATTN_IMPLEMENTATION = "fastbert"

# Hugging Face ``hidden_act`` -> fastbert ``approximate``; anything else keeps HF's.
HIDDEN_ACT_TO_APPROXIMATE = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
}


def _hf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("fastbert.integrations.transformers needs transformers>=5,<6: "
                          "pip install 'fastbert[demo]'") from e
    major = int(transformers.__version__.split(".")[0])
    if not 5 <= major < 6:
        raise ImportError(f"fastbert.integrations.transformers: expected transformers>=5,<6, "
                          f"got {transformers.__version__}")
    return transformers


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def _split_mask(attention_mask: Optional[Tensor], dtype: torch.dtype
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """transformers' mask -> (2-D padding mask, additive bias); at most one is not None.

    2-D ``(batch, seqlen_k)`` (from :func:`fastbert_mask`): True / nonzero = attend.
    4-D boolean ``(batch, 1 | num_heads, seqlen_q, seqlen_k)``: True = attend -> 0 / ``-inf``.
    4-D float: already additive (transformers' eager convention), used as is.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        return attention_mask, None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: expected 2 or 4 dims, got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return None, bias.masked_fill(~attention_mask, float("-inf"))
    return None, attention_mask.to(dtype)


def attention_probs_forward(query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Optional[Tensor], attn_bias: Optional[Tensor],
                            dropout_p: float, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Attention in plain torch ops that also returns the probabilities (``output_attentions``).

    The same math and masking rules as :func:`fastbert.ops.attention` (Vaswani et al. 2017,
    eq. 1): a row with no key to attend returns zeros and zero probabilities, never NaN.
    Dropout uses torch's RNG (not fastbert's Philox scheme), as transformers' eager path does.

    Args:
        query, key, value: ``(batch, num_heads, seqlen, head_dim)`` (transformers' layout).
        attention_mask: None or ``(batch, seqlen_k)``, True / nonzero = attend.
        attn_bias: None or additive, broadcastable to ``(batch, num_heads, seqlen_q, seqlen_k)``.

    Returns:
        ``out`` ``(batch, seqlen_q, num_heads, head_dim)`` and ``probs`` ``(batch, num_heads,
        seqlen_q, seqlen_k)``, both in query's dtype (scores and softmax in fp32).
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * softmax_scale
    if attn_bias is not None:
        scores = scores + attn_bias.float()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    # Zero-fill empty rows before the softmax and zero them after: no NaN, not even in gradients.
    has_key = (scores > float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    probs = probs.to(query.dtype)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0.0 else probs
    out = torch.matmul(dropped, value).transpose(1, 2)
    return out, probs


def packed_sequences(kwargs: dict, batch: int, seqlen: int) -> Optional[tuple[Tensor, int]]:
    """The sequence boundaries of a padding-free (packed) batch, as varlen attention takes them.

    transformers' ``DataCollatorWithFlattening`` concatenates the sequences of a batch into one
    row ``(1, total_tokens)`` and marks the boundaries either with ``cu_seq_lens_q`` ``(n + 1,)``
    and ``max_length_q`` (``return_flash_attn_kwargs=True``) or only with ``position_ids`` that
    restart for every sequence (at ``position_ids_start``, e.g. 2 for RoBERTa): a sequence starts
    wherever a position is not its predecessor + 1 (transformers' own rule).

    Args:
        kwargs: the forward's keyword arguments (``cu_seq_lens_q``, ``max_length_q``, ``position_ids``).
        batch, seqlen: the batch's padded shape.

    Returns:
        ``(cu_seqlens (n + 1,) int32, max_seqlen int)``, or None for an ordinary batch (no
        ``cu_seq_lens_q`` and batch > 1, or positions without a restart). Reading
        ``position_ids`` costs one host sync; under ``torch.compile`` only ``cu_seq_lens_q`` counts.

    Raises:
        ValueError: ``cu_seq_lens_q`` with batch != 1.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: a padding-free batch has batch size 1, got {batch}")
        max_len = kwargs.get("max_length_q")
        max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
        return cu.to(torch.int32), max_len
    pos = kwargs.get("position_ids")
    if pos is None or batch != 1 or pos.numel() != seqlen or seqlen < 2 or torch.compiler.is_compiling():
        return None
    pos = pos.reshape(-1)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    cu = F.pad(starts, (1, 1)).to(torch.int32)
    cu[-1] = seqlen
    return cu, int((cu[1:] - cu[:-1]).max())


def fastbert_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' ``AttentionInterface`` function for ``attn_implementation="fastbert"``.

    Args:
        module: the calling attention module (its ``_fastbert_backend`` attribute, set by
            :func:`patch`, forces a fastbert backend).
        query, key, value: ``(batch, num_heads, seqlen, head_dim)``, as transformers passes them;
            read in place through ``.transpose(1, 2)`` views.
        attention_mask: what :func:`fastbert_mask` built: None, the 2-D padding mask
            ``(batch, seqlen_k)`` (True = attend), or a 4-D mask (boolean, or transformers'
            additive float mask).
        dropout: attention-probability dropout (transformers passes 0 in eval mode).
        scaling: softmax scale, ``1 / sqrt(head_dim)`` when None.
        kwargs: ``output_attentions=True`` selects the plain torch path that returns the
            probabilities; other keys (position_ids, ...) are ignored.

    Returns:
        ``(out, probs)``: out ``(batch, seqlen_q, num_heads, head_dim)`` in query's dtype (the
        layout transformers reshapes to ``(batch, seqlen_q, hidden)``); probs ``(batch,
        num_heads, seqlen_q, seqlen_k)`` with ``output_attentions=True``, else None.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: not supported by attn_implementation='fastbert'")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding_window: not supported by attn_implementation='fastbert'")
    if getattr(module, "num_key_value_groups", 1) != 1:
        raise ValueError(f"num_key_value_groups: attn_implementation='fastbert' supports 1 (BERT's "
                         f"multi-head attention), got {module.num_key_value_groups}")
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
    if is_causal and attention_mask is None and query.shape[2] > 1:
        # fastbert_mask always materialises causal masks; a causal call without one would
        # silently attend to the future.
        raise ValueError("attention_mask: a causal attention call needs a mask with "
                         "attn_implementation='fastbert' (fastbert.ops.attention has no is_causal)")
    softmax_scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask2d, bias = _split_mask(attention_mask, query.dtype)
    probs_wanted = kwargs.get("output_attentions", False) or "attentions" in (_collector() or {})
    packed = packed_sequences(kwargs, query.shape[0], query.shape[2]) if key.shape[2] == query.shape[2] else None
    if packed is not None and mask2d is None and bias is None:
        cu_seqlens, max_seqlen = packed
        if probs_wanted:  # the probabilities are dense anyway: a block-diagonal mask over the row
            seq = torch.searchsorted(cu_seqlens[1:], torch.arange(query.shape[2], device=query.device), right=True)
            block = torch.zeros(seq.shape * 2, dtype=query.dtype, device=query.device)
            block = block.masked_fill(seq[:, None] != seq[None, :], float("-inf"))
            return attention_probs_forward(query, key, value, None, block, dropout, softmax_scale)
        # (1, H, total, d) -> (total, H, d) views: varlen attention on the sequences' own boundaries
        out = attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout,
                        softmax_scale=softmax_scale, backend=getattr(module, "_fastbert_backend", None))
        return out[None], None
    if probs_wanted:
        return attention_probs_forward(query, key, value, mask2d, bias, dropout, softmax_scale)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                    attention_mask=mask2d, attn_bias=bias, dropout_p=dropout,
                    softmax_scale=softmax_scale, backend=getattr(module, "_fastbert_backend", None))
    return out, None


def fastbert_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None, attention_mask: Optional[Tensor] = None,
                  **kwargs) -> Optional[Tensor]:
    """transformers' ``AttentionMaskInterface`` function for ``attn_implementation="fastbert"``.

    Bidirectional attention (BERT's encoder and cross-attention): returns the 2-D padding mask
    ``(batch, kv_length)`` as given (bool, True = attend; the last ``kv_length`` columns), or
    None without one. Unlike transformers' flash-attention mask function it never drops an
    all-True mask, since that check would read tensor values (a host sync, a graph break).
    Any other ``mask_function`` (causal, packed sequences, overlays): the 4-D boolean mask of
    transformers' ``sdpa_mask`` ``(batch, 1, q_length, kv_length)``.
    """
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if mask_function is None or mask_function is bidirectional_mask_function:
        return None if attention_mask is None else attention_mask[:, -kv_length:]
    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(name, None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     **kwargs)


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register fastbert's attention and mask functions with transformers under ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` work for every model built on transformers'
    ``AttentionInterface`` (BERT and its family). Registers both the attention function and the
    mask function (without the latter transformers silently passes no padding mask).
    Idempotent. Returns ``name``.
    """
    _hf()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastbert_attention_forward)
    AttentionMaskInterface.register(name, fastbert_mask)
    return name


# ------------------------------------------------------------------------------------------------
# Fused block forwards (bound to module instances by patch)
# ------------------------------------------------------------------------------------------------

def _add_norm_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    """``*SelfOutput`` / ``*Output``: ``LN(dropout(dense(h)) + input)``, dropout, residual add and
    LayerNorm in one fused op (the dense bias too where the backend fuses it)."""
    return _dense_add_norm(self, hidden_states, input_tensor, self.dense, self.LayerNorm, self.dropout.p)


def _intermediate_forward(self, hidden_states: Tensor) -> Tensor:
    """``*Intermediate``: ``gelu(dense(h))`` (the dense bias fused into GELU where the backend fuses it)."""
    return _dense_act(self, self.dense, hidden_states)


_PATCH_ATTRS = ("forward", "_fastbert_backend", "_fastbert_approximate", "_fastbert_encoder", "backend",
                "approximate", "act_fn")


def _is_add_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return (name.endswith("Output") and isinstance(getattr(m, "dense", None), nn.Linear)
            and type(getattr(m, "LayerNorm", None)) is nn.LayerNorm
            and isinstance(getattr(m, "dropout", None), nn.Dropout)
            and len(getattr(m.LayerNorm, "normalized_shape", ())) == 1)


def _is_intermediate(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("Intermediate")
            and isinstance(getattr(m, "dense", None), nn.Linear)
            and hasattr(m, "intermediate_act_fn"))


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return (name.endswith("SelfAttention") or name.endswith("CrossAttention")) and all(
        isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value"))


# ------------------------------------------------------------------------------------------------
# The unpadded encoder: fastbert's Encoder loop over the transformers layers' own modules
# ------------------------------------------------------------------------------------------------

class _LayerBlock(nn.Module):
    """fastbert's block protocol (:mod:`fastbert.nn.encoder`) over one transformers BERT-layout layer
    (``attention.self.{query,key,value}``, ``attention.output``, ``intermediate``, ``output``).

    Reads the layer's parameters and dropout rates at every call (no copies); the layer is held
    outside the module tree, so neither the parameters nor ``train()`` / ``eval()`` are shared.
    Runs the same fused math as :class:`fastbert.nn.BertLayer`.
    """

    def __init__(self, layer: nn.Module, backend: Optional[str], approximate: Optional[str]):
        super().__init__()
        self.__dict__["hf"] = layer  # not a child module: the model owns it
        self.backend = backend
        self.approximate = approximate
        att = self._attention()
        self.num_attention_heads, self.attention_head_size = self._heads(att)

    def _attention(self) -> nn.Module:
        return self.hf.attention.self

    @staticmethod
    def _heads(att) -> tuple[int, int]:
        return att.num_attention_heads, att.attention_head_size

    @property
    def dropout_p(self) -> float:  # the attention probabilities' dropout, read by self_attention
        return self._attention().dropout.p

    @property
    def act_fn(self):  # read by _dense_act; None = fastbert's GELU with the fused bias
        return None if self.approximate is not None else self.hf.intermediate.intermediate_act_fn

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        hf = self.hf
        att, so, out = hf.attention.self, hf.attention.output, hf.output
        context, probs = self_attention(self, hidden_states, (att.query, att.key, att.value), attention_mask, **kw)
        a = _dense_add_norm(self, context, hidden_states, so.dense, so.LayerNorm, so.dropout.p)
        h = _dense_act(self, hf.intermediate.dense, a)
        return _dense_add_norm(self, h, a, out.dense, out.LayerNorm, out.dropout.p), probs


class _DistilBertLayerBlock(_LayerBlock):
    """The same over a transformers DistilBERT ``TransformerBlock`` (``attention.{q,k,v,out}_lin``,
    ``sa_layer_norm``, ``ffn.{lin1,lin2}``, ``output_layer_norm``); as :class:`fastbert.nn.bert.DistilBertBlock`."""

    def _attention(self) -> nn.Module:
        return self.hf.attention

    @staticmethod
    def _heads(att) -> tuple[int, int]:
        return att.n_heads, att.attention_head_size

    @property
    def act_fn(self):
        return None if self.approximate is not None else self.hf.ffn.activation

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        hf = self.hf
        att, ffn = hf.attention, hf.ffn
        context, probs = self_attention(self, hidden_states, (att.q_lin, att.k_lin, att.v_lin), attention_mask, **kw)
        sa = _dense_add_norm(self, context, hidden_states, att.out_lin, hf.sa_layer_norm, 0.0)  # no dropout here
        h = _dense_act(self, ffn.lin1, sa)
        return _dense_add_norm(self, h, sa, ffn.lin2, hf.output_layer_norm, ffn.dropout.p), probs


def _collector() -> Optional[dict]:
    """The outputs transformers' ``capture_outputs`` is collecting for this forward (``{"attentions":
    [...], "hidden_states": [...], ...}``, from the call's ``output_*`` or the config), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers 5 releases
        return None
    return _active_collector.get()


def _record(collected: dict, hidden_states, attentions) -> None:
    """Hand the encoder's outputs to transformers' collector, as its forward hooks would have."""
    if hidden_states is not None and "hidden_states" in collected:
        out, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
        for h in hidden_states:
            out.append(h if selection is None or len(out) in selection else None)
    if attentions is not None and "attentions" in collected:
        collected["attentions"].extend(attentions)


def _encoder_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                     encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask=None,
                     cache=None, use_cache=None, **kwargs):
    """``*Encoder.forward`` of a patched BERT-layout model: fastbert's unpadded :class:`fastbert.nn.Encoder`
    (see :func:`_run_unpadded`). Decoders (cross-attention, a cache, a causal mask) take the class's
    own forward over the patched blocks."""
    if encoder_hidden_states is not None or cache is not None or getattr(self.config, "is_decoder", False):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache,
                                  use_cache=use_cache, **kwargs)
    out = _run_unpadded(self, hidden_states, attention_mask, kwargs)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _transformer_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
    """DistilBERT's ``Transformer.forward`` of a patched model (see :func:`_run_unpadded`)."""
    out = _run_unpadded(self, hidden_states, attention_mask, kwargs)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=out)


def _run_unpadded(self, hidden_states: Tensor, attention_mask: Optional[Tensor], kwargs: dict):
    """Run transformers encoder ``self`` through its fastbert :class:`fastbert.nn.Encoder`.

    hidden_states ``(batch, seqlen, hidden)`` (the embeddings); attention_mask what
    :func:`fastbert_mask` built: None or ``(batch, seqlen)`` (True = real token). The real tokens
    are packed once, every layer runs on ``(total_tokens, hidden)`` with varlen attention, and the
    result is scattered back once (zeros at padding); a batch without padding runs as is. A
    padding-free batch (:func:`packed_sequences`) runs varlen on its own sequence boundaries.
    Under ``torch.compile`` it runs padded (packing has data-dependent shapes). Hidden states and attentions go to transformers' output collector. Returns the last hidden
    state ``(batch, seqlen, hidden)``, or None where this path does not apply (a 4-D mask): the
    caller runs transformers' own forward.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        return None
    packed_batch = packed_sequences(kwargs, *hidden_states.shape[:2])
    collected = _collector() or {}
    if packed_batch is not None and "attentions" in collected:
        return None  # per-sequence probabilities of a packed row: the attention function's block mask
    encoder: Encoder = self.__dict__["_fastbert_encoder"]
    encoder.train(self.training)
    first = self.layer[0]
    encoder.gradient_checkpointing = bool(getattr(first, "gradient_checkpointing", False))
    if getattr(first, "_gradient_checkpointing_func", None) is not None:
        encoder._gradient_checkpointing_func = first._gradient_checkpointing_func
    compiling = torch.compiler.is_compiling()
    packed = {}
    if packed_batch is not None and attention_mask is None:  # padding-free: the sequences' own boundaries
        packed = dict(indices=torch.arange(hidden_states.shape[1], device=hidden_states.device),
                      cu_seqlens=packed_batch[0], max_seqlen=packed_batch[1])
    elif attention_mask is not None and not compiling and bool(attention_mask.all()):
        attention_mask = None  # no padding: skip the pack / unpack
    out = encoder(hidden_states, attention_mask, unpad=not compiling,
                  output_attentions="attentions" in collected,
                  output_hidden_states="hidden_states" in collected, **packed)
    _record(collected, out.hidden_states, out.attentions)
    return out.last_hidden_state


def _is_distilbert_transformer(m: nn.Module) -> bool:
    layers = getattr(m, "layer", None)
    return (type(m).__name__ == "Transformer" and isinstance(layers, nn.ModuleList) and len(layers) > 0
            and all(all(isinstance(getattr(getattr(lay, "attention", None), n, None), nn.Linear)
                        for n in ("q_lin", "k_lin", "v_lin", "out_lin"))
                    and all(isinstance(getattr(getattr(lay, "ffn", None), n, None), nn.Linear) for n in ("lin1", "lin2"))
                    and type(getattr(lay, "sa_layer_norm", None)) is nn.LayerNorm
                    and type(getattr(lay, "output_layer_norm", None)) is nn.LayerNorm for lay in layers))


def _is_encoder(m: nn.Module) -> bool:
    layers = getattr(m, "layer", None)
    return (type(m).__name__.endswith("Encoder") and isinstance(layers, nn.ModuleList) and len(layers) > 0
            and all(_is_attention(getattr(getattr(lay, "attention", None), "self", None) or nn.Module())
                    and _is_add_norm(getattr(lay.attention, "output", None) or nn.Module())
                    and _is_intermediate(getattr(lay, "intermediate", None) or nn.Module())
                    and _is_add_norm(getattr(lay, "output", None) or nn.Module()) for lay in layers))


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has rewired ``model`` (and :func:`unpatch` has not undone it)."""
    return getattr(model, "_fastbert_patch_state", None) is not None


def patch(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Rewire a transformers BERT-family model in place to run fastbert's unpadded fused encoder.

    The base models and every head of BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA and
    DistilBERT (tested), and any model with BERT's block layout (an ``*Encoder`` whose layers hold
    ``attention.self.{query,key,value}`` / ``attention.output`` / ``intermediate`` / ``output``).
    The encoder's forward becomes fastbert's unpadded :class:`fastbert.nn.Encoder` over the
    layers' own parameters (see the module docstring). Attention switches to
    ``attn_implementation="fastbert"`` (see :func:`register`). For the decoder path the add &
    norm blocks run ``layer_norm(dense_nobias(h), x_bias=dense.bias, residual=input,
    dropout_p=...)``; the intermediate block runs ``gelu(dense_nobias(h), bias=dense.bias)`` when
    ``config.hidden_act`` maps to fastbert's GELU (``gelu``, ``gelu_python`` -> erf; ``gelu_new``,
    ``gelu_pytorch_tanh``, ``gelu_fast``, ``gelu_accurate`` -> tanh) and keeps Hugging Face's
    activation otherwise. Submodule names, parameters, state_dict keys, ``output_attentions``,
    gradient checkpointing and ``save_pretrained`` keep working (transformers does not write the
    attention implementation into ``config.json``, so the checkpoint loads in plain
    transformers). Patching a patched model is a no-op.

    Args:
        model: a transformers ``PreTrainedModel`` of the BERT family.
        backend: force a fastbert backend for every op (``"torch"``, ``"triton"``, ...); else
            ``FASTBERT_BACKEND``, else automatic.

    Returns:
        ``model`` (patched in place).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: no BERT-family encoder or attention / add & norm block was found in ``model``.
    """
    transformers = _hf()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        return model
    attention_modules = [m for m in model.modules() if _is_attention(m)]
    add_norms = [m for m in model.modules() if _is_add_norm(m)]
    intermediates = [m for m in model.modules() if _is_intermediate(m)]
    encoders = [(m, _LayerBlock, _encoder_forward) for m in model.modules() if _is_encoder(m)]
    encoders += [(m, _DistilBertLayerBlock, _transformer_forward) for m in model.modules()
                 if _is_distilbert_transformer(m)]
    if not encoders and (not attention_modules or not add_norms):
        raise ValueError(f"model: expected a BERT-family model with *SelfAttention and *Output "
                         f"blocks, found {len(attention_modules)} attention and {len(add_norms)} "
                         f"add & norm blocks in {type(model).__name__}")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    hidden_act = getattr(model.config, "hidden_act", getattr(model.config, "activation", None))
    approximate = HIDDEN_ACT_TO_APPROXIMATE.get(hidden_act) if isinstance(hidden_act, str) else None
    for m in attention_modules:
        m._fastbert_backend = backend
    for m in add_norms:
        m._fastbert_backend = m.backend = backend
        m.forward = types.MethodType(_add_norm_forward, m)
    if approximate is not None:
        for m in intermediates:
            m._fastbert_backend = m.backend = backend
            m._fastbert_approximate = m.approximate = approximate
            m.act_fn = None  # fastbert's GELU
            m.forward = types.MethodType(_intermediate_forward, m)
    for m, block, forward in encoders:
        blocks = [block(layer, backend, approximate) for layer in m.layer]
        m.__dict__["_fastbert_encoder"] = Encoder(blocks)  # not a child: no new state_dict keys
        m.forward = types.MethodType(forward, m)
    model._fastbert_patch_state = {"attn_implementation": previous}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: class forwards and the previous attention implementation come back.

    Returns ``model``; a model that is not patched is returned unchanged.
    """
    state = getattr(model, "_fastbert_patch_state", None)
    if state is None:
        return model
    for m in model.modules():
        if not any(a in m.__dict__ for a in ("_fastbert_backend", "_fastbert_encoder")):
            continue
        for attr in _PATCH_ATTRS:
            if attr in m.__dict__ and (attr != "forward" or _is_fastbert_forward(m.__dict__[attr])):
                delattr(m, attr)
    model.set_attn_implementation(state["attn_implementation"])
    del model._fastbert_patch_state
    return model


def _is_fastbert_forward(f) -> bool:
    return isinstance(f, types.MethodType) and f.__func__ in (_add_norm_forward, _intermediate_forward, _encoder_forward,
                                                           _transformer_forward)

