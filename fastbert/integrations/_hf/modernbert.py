"""patch() for transformers' ModernBERT (``ModernBertModel`` and every head that holds one).

The patched ``ModernBertModel.forward`` runs transformers' own embeddings, then fastbert's
unpadded :class:`fastbert.nn.Encoder` (:func:`~fastbert.integrations._hf.encoder.run_encoder`,
the route the BERT family takes) over pre-norm blocks that are :mod:`fastbert.nn.modernbert`'s own
classes reading the transformers layers' parameters at every call: ``Wqkv`` -> rotary
(:func:`fastbert.ops.rotary`, rotate_half, positions restarting per packed sequence) -> varlen
attention (:func:`fastbert.ops.attention` with ``cu_seqlens`` / ``max_seqlen``; a
``sliding_attention`` layer of ``config.layer_types`` with ``window=(local_attention // 2,
local_attention // 2)``, transformers' ``abs(i - j) <= local_attention // 2``) -> ``Wo``; the MLP
is a GeGLU (:func:`fastbert.ops.geglu` when ``hidden_activation`` is a GELU; otherwise
transformers' own activation, ``act(a) * g``); the LayerNorms run :func:`fastbert.ops.layer_norm`
on transformers' weights; then ``final_norm``. Rotary tables come from the model's own
``rotary_emb.{layer_type}_inv_freq`` (fp32 angles, as transformers computes them).

Positions: transformers numbers the padded columns ``0..seqlen-1``; packed, positions restart at 0
per sequence. Rotary attention depends on position differences only, so the two agree up to
rounding even with left padding; ``position_ids``, when given, are used as they are (packed like
the tokens). What keeps transformers' own forward: a mask that is not 2-D (a dict of per-layer
masks, a 4-D mask). A padding-free (packed) batch runs as one sequence, as transformers' sdpa path
runs it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastbert.integrations._hf.encoder import PatchedForward, run_encoder
from fastbert.nn.encoder import Encoder, PreNormLayer
from fastbert.nn.modernbert import LAYER_TYPES, ModernBertAttention, ModernBertMLP, rope_theta
from fastbert.nn.modules import OpsModule, resolve_activation
from fastbert.ops import layer_norm


class _Norm(OpsModule, nn.Module):
    """:func:`fastbert.ops.layer_norm` over a transformers ``nn.LayerNorm`` (held outside the tree)."""

    def __init__(self, norm: nn.LayerNorm, backend: Optional[str]):
        super().__init__()
        self.__dict__["hf"] = norm
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        n = self.hf
        return layer_norm(x, n.weight, n.bias, eps=n.eps, backend=self.backend)


class _Attention(ModernBertAttention):
    """fastbert's :class:`~fastbert.nn.modernbert.ModernBertAttention` forward over a transformers
    ``ModernBertAttention``'s ``Wqkv`` / ``Wo`` and dropout rate (read at every call)."""

    def __init__(self, attn: nn.Module, config, layer_idx: int, backend: Optional[str]):
        nn.Module.__init__(self)  # no parameters of its own
        self.__dict__["hf"] = attn
        self.num_heads, self.head_dim = config.num_attention_heads, attn.head_dim
        self.layer_type = config.layer_types[layer_idx]
        half = config.local_attention // 2
        self.window = (half, half) if self.layer_type == "sliding_attention" else None
        self.backend = backend

    Wqkv = property(lambda self: self.hf.Wqkv)
    Wo = property(lambda self: self.hf.Wo)
    dropout_p = property(lambda self: float(self.hf.attention_dropout))


class _MLP(ModernBertMLP):
    """fastbert's :class:`~fastbert.nn.modernbert.ModernBertMLP` forward (GeGLU) over a transformers
    ``ModernBertMLP``'s ``Wi`` / ``Wo``; a non-GELU activation is transformers' own ``act``."""

    def __init__(self, mlp: nn.Module, hidden_activation: str, backend: Optional[str]):
        nn.Module.__init__(self)
        self.__dict__["hf"] = mlp
        self.approximate, fn = resolve_activation(hidden_activation)
        self.__dict__["act_fn"] = None if fn is None else mlp.act  # not a child module
        self.backend = backend

    Wi = property(lambda self: self.hf.Wi)
    Wo = property(lambda self: self.hf.Wo)
    dropout_p = property(lambda self: float(self.hf.drop.p))


def _block(layer: nn.Module, config, layer_idx: int, backend: Optional[str]) -> PreNormLayer:
    attn_norm = nn.Identity() if isinstance(layer.attn_norm, nn.Identity) else _Norm(layer.attn_norm, backend)
    return PreNormLayer(attn_norm, _Attention(layer.attn, config, layer_idx, backend),
                        _Norm(layer.mlp_norm, backend), _MLP(layer.mlp, config.hidden_activation, backend))


def rotary_tables(rotary_emb: nn.Module, positions: int, device) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer_type: (cos, sin)}``, each ``(positions, head_dim / 2)`` fp32, from transformers'
    ``{layer_type}_inv_freq`` buffers: the angles ``p * inv_freq`` in fp32, as transformers computes them."""
    pos = torch.arange(positions, device=device, dtype=torch.float)
    out = {}
    for t in rotary_emb.layer_types:
        angles = pos[:, None] * getattr(rotary_emb, f"{t}_inv_freq").to(device=device, dtype=torch.float)[None]
        out[t] = (angles.cos(), angles.sin())
    return out


def _encode(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """The patched forward's body (wrapped by transformers' ``capture_outputs``: ``output_*``)."""
    from transformers.modeling_outputs import BaseModelOutput

    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
    hidden_states = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
    seqlen = hidden_states.shape[1]
    encoder: Encoder = self.__dict__["_fastbert_encoder"]
    positions = seqlen if position_ids is None else max(seqlen, self.config.max_position_embeddings)
    tables = rotary_tables(self.rotary_emb, positions, hidden_states.device)
    out = run_encoder(self, hidden_states, attention_mask, kwargs, hf_layers=self.layers, padding_free=False,
                      position_ids=position_ids, final_norm=encoder.final_norm, block_kwargs=dict(rotary=tables))
    return BaseModelOutput(last_hidden_state=out)


_CAPTURED = []  # the wrapped _encode, built once on first use (transformers is imported lazily)


def _captured():
    if not _CAPTURED:
        from transformers.utils.generic import merge_with_config_defaults
        from transformers.utils.output_capturing import capture_outputs

        _CAPTURED.append(merge_with_config_defaults(capture_outputs(_encode)))
    return _CAPTURED[0]


def _modernbert_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                        **kwargs):
    """``ModernBertModel.forward`` of a patched model (see the module docstring)."""
    if attention_mask is not None and not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2):
        return type(self).forward(self, input_ids, attention_mask, position_ids, inputs_embeds, **kwargs)
    return _captured()(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, **kwargs)


def modernbert_models(model: nn.Module) -> list[nn.Module]:
    """The transformers ``ModernBertModel`` modules inside ``model`` (``model`` itself included)."""
    try:
        from transformers.models.modernbert.modeling_modernbert import ModernBertModel
    except ImportError:  # pragma: no cover - every transformers 5 release has ModernBERT
        return []
    return [m for m in model.modules() if isinstance(m, ModernBertModel)]


def patch_modernbert(models: list[nn.Module], backend: Optional[str]) -> None:
    """Rewire each transformers ``ModernBertModel`` in ``models`` in place.

    Raises:
        NotImplementedError: a ``rope_type`` other than ``"default"`` (scaled RoPE variants).
        ValueError: a ``layer_types`` entry other than ``full_attention`` / ``sliding_attention``.
    """
    for m in models:
        cfg = m.config
        for i, t in enumerate(cfg.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}]: expected one of {LAYER_TYPES}, got {t!r}")
        for t in set(cfg.layer_types):
            rope_theta(cfg, t)  # NotImplementedError for scaled RoPE
    for m in models:
        encoder = Encoder([_block(layer, m.config, i, backend) for i, layer in enumerate(m.layers)])
        encoder.final_norm = _Norm(m.final_norm, backend)
        m.__dict__["_fastbert_encoder"] = encoder  # not a child: no new state_dict keys
        m.forward = PatchedForward(_modernbert_forward, m)
