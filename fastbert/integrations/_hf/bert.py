"""patch() for BERT-layout transformers models: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA
(an ``*Encoder`` of layers with ``attention.self.{query,key,value}`` / ``attention.output`` /
``intermediate`` / ``output``) and DistilBERT (``Transformer`` of ``TransformerBlock``).

The encoder's forward becomes fastbert's unpadded :class:`fastbert.nn.Encoder` (via
:func:`fastbert.integrations._hf.encoder.run_encoder`) over blocks that read the transformers
layers' own parameters and run :mod:`fastbert.nn.bert`'s fused math. Decoders (causal masks,
cross-attention, a cache) keep transformers' layer loop, over add & norm (``*SelfOutput``,
``*Output``) and intermediate blocks whose forwards are rerouted to the same fused ops.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastbert.integrations._hf.attention import ATTN_IMPLEMENTATION, register
from fastbert.integrations._hf.encoder import PatchedForward, run_encoder
from fastbert.nn.bert import _dense_act, _dense_add_norm, self_attention
from fastbert.nn.encoder import Encoder

HIDDEN_ACT_TO_APPROXIMATE = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
}



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


def _encoder_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                     encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask=None,
                     cache=None, use_cache=None, **kwargs):
    """``*Encoder.forward`` of a patched BERT-layout model: fastbert's unpadded :class:`fastbert.nn.Encoder`
    (see :func:`~fastbert.integrations._hf.encoder.run_encoder`). Decoders (cross-attention, a cache, a causal mask) take the class's
    own forward over the patched blocks."""
    if encoder_hidden_states is not None or cache is not None or getattr(self.config, "is_decoder", False):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache,
                                  use_cache=use_cache, **kwargs)
    out = run_encoder(self, hidden_states, attention_mask, kwargs, hf_layers=self.layer)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _transformer_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
    """DistilBERT's ``Transformer.forward`` of a patched model (see :func:`~fastbert.integrations._hf.encoder.run_encoder`)."""
    out = run_encoder(self, hidden_states, attention_mask, kwargs, hf_layers=self.layer)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=out)

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


def patch_bert(model: nn.Module, backend: Optional[str]) -> None:
    """Rewire the BERT-layout blocks of ``model`` in place (see :func:`fastbert.integrations.transformers.patch`).

    Raises:
        ValueError: no BERT-family encoder or attention / add & norm block was found in ``model``.
    """
    attention_modules = [m for m in model.modules() if _is_attention(m)]
    add_norms = [m for m in model.modules() if _is_add_norm(m)]
    intermediates = [m for m in model.modules() if _is_intermediate(m)]
    encoders = [(m, _LayerBlock, _encoder_forward) for m in model.modules() if _is_encoder(m)]
    encoders += [(m, _DistilBertLayerBlock, _transformer_forward) for m in model.modules()
                 if _is_distilbert_transformer(m)]
    if not encoders and (not attention_modules or not add_norms):
        raise ValueError(f"model: expected a BERT-family model (or a ModernBERT one) with *SelfAttention and *Output "
                         f"blocks, found {len(attention_modules)} attention and {len(add_norms)} "
                         f"add & norm blocks in {type(model).__name__}")
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    hidden_act = getattr(model.config, "hidden_act", getattr(model.config, "activation", None))
    approximate = HIDDEN_ACT_TO_APPROXIMATE.get(hidden_act) if isinstance(hidden_act, str) else None
    for m in attention_modules:
        m._fastbert_backend = backend
    for m in add_norms:
        m._fastbert_backend = m.backend = backend
        m.forward = PatchedForward(_add_norm_forward, m)
    if approximate is not None:
        for m in intermediates:
            m._fastbert_backend = m.backend = backend
            m._fastbert_approximate = m.approximate = approximate
            m.act_fn = None  # fastbert's GELU
            m.forward = PatchedForward(_intermediate_forward, m)
    for m, block, forward in encoders:
        blocks = [block(layer, backend, approximate) for layer in m.layer]
        m.__dict__["_fastbert_encoder"] = Encoder(blocks)  # not a child: no new state_dict keys
        m.forward = PatchedForward(forward, m)
