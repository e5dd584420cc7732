"""ModernBERT's blocks (Warner et al. 2024) on fastbert ops, with transformers' module names.

Pre-norm layers (:class:`fastbert.nn.PreNormLayer`: ``attn_norm``, ``attn``, ``mlp_norm``, ``mlp``)
whose attention is a fused ``Wqkv`` projection, rotary embeddings (:func:`fastbert.ops.rotary`,
rotate_half layout) with a global and a local base, and either global attention or a sliding
window of ``local_attention // 2`` keys each side (``window=(w, w)``, transformers'
``abs(i - j) <= local_attention // 2``); the MLP is a GeGLU (:func:`fastbert.ops.geglu`: ``Wi``'s
first half through GELU, times its second half). LayerNorms have no bias unless ``norm_bias``.

The blocks read a config with transformers' ``ModernBertConfig`` field names (``hidden_size``,
``num_attention_heads``, ``intermediate_size``, ``hidden_activation``, ``norm_eps``, ``norm_bias``,
``attention_bias``, ``mlp_bias``, ``attention_dropout``, ``mlp_dropout``, ``embedding_dropout``,
``layer_types``, ``local_attention``, ``rope_parameters``, ``max_position_embeddings``); nn/ does
not import transformers. Layouts: padded ``(batch, seqlen, hidden)`` with a bool mask, or packed
``(total_tokens, hidden)`` with ``cu_seqlens`` / ``max_seqlen`` (block protocol of
:mod:`fastbert.nn.encoder`), plus two block keywords: ``rotary`` (``{layer_type: (cos, sin)}``,
from :class:`RotaryTables`) and ``position_ids`` (padded ``(batch or 1, seqlen)``, packed
``(total_tokens,)``, or None: ``0..seqlen-1``, restarting per sequence when packed).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.nn.bert import _dense_act, attention_probs
from fastbert.nn.encoder import PreNormLayer, check_ids, embeds_as_table
from fastbert.nn.modules import LayerNorm, OpsModule, resolve_activation
from fastbert.nn.padding import pad_input
from fastbert.ops import attention, fuses_dense_bias, geglu, rotary

LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_theta(config, layer_type: str) -> float:
    """The rotary base of ``layer_type`` (``rope_parameters[layer_type]["rope_theta"]``).

    Raises:
        NotImplementedError: a ``rope_type`` other than ``"default"`` (scaled RoPE variants).
    """
    params = config.rope_parameters[layer_type]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise NotImplementedError(f"rope_parameters[{layer_type!r}]: only rope_type 'default' is supported, "
                                  f"got {kind!r}")
    return float(params["rope_theta"])


def rope_tables(head_dim: int, base: float, max_positions: int) -> tuple[Tensor, Tensor]:
    """cos / sin ``(max_positions, head_dim / 2)`` fp32 of the angles ``p * base^(-2i / head_dim)``
    (Su et al. 2021, eq. 15), computed as transformers computes them (fp32 products, then cos/sin)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


class RotaryTables(nn.Module):
    """The cos / sin tables per layer type as non-persistent buffers (``{type}_cos``, ``{type}_sin``,
    ``(max_position_embeddings, head_dim / 2)`` fp32): not in the state_dict, moved by ``.to()``."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.theta = {t: rope_theta(config, t) for t in sorted(set(config.layer_types))}
        for t, base in self.theta.items():
            cos, sin = rope_tables(self.head_dim, base, self.max_positions)
            self.register_buffer(f"{t}_cos", cos, persistent=False)
            self.register_buffer(f"{t}_sin", sin, persistent=False)

    def tables(self, positions: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer_type: (cos, sin)}``, the ``rotary`` block keyword: the buffers, or, for a batch
        longer than ``max_position_embeddings`` (``positions`` rows needed), tables computed for it,
        as transformers' ModernBERT computes its angles per call for any length."""
        if positions > self.max_positions:
            device = getattr(self, f"{next(iter(self.theta))}_cos").device
            return {t: tuple(x.to(device) for x in rope_tables(self.head_dim, base, positions))
                    for t, base in self.theta.items()}
        return {t: (getattr(self, f"{t}_cos"), getattr(self, f"{t}_sin")) for t in self.theta}

    def fresh(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Recomputed tables (to fill buffers of a model built on the meta device)."""
        return {t: rope_tables(self.head_dim, base, self.max_positions) for t, base in self.theta.items()}


def _norm(config, hidden: int) -> LayerNorm:
    return LayerNorm(hidden, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertEmbeddings(OpsModule, nn.Module):
    """``dropout(norm(tok_embeddings(input_ids)))`` (no positions: rotary embeddings in attention).

    forward(input_ids=None, inputs_embeds=None) -> ``(batch, seqlen, hidden)``.

    Raises:
        TypeError, ValueError: input_ids of another dtype than int64 / int32 or out of the
            vocabulary, inputs_embeds not floating point (:func:`fastbert.nn.encoder.check_ids`).
    """

    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = _norm(config, config.hidden_size)
        self.dropout_p = float(config.embedding_dropout)

    def forward(self, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        if inputs_embeds is None:
            check_ids("input_ids", input_ids, self.tok_embeddings)
            x = self.tok_embeddings(input_ids)
        else:
            x = embeds_as_table(inputs_embeds, self.tok_embeddings)
        return F.dropout(self.norm(x), self.dropout_p, self.training)


def windowed_probs(q: Tensor, k: Tensor, attention_mask: Optional[Tensor], softmax_scale: float,
                   window: Optional[tuple[int, int]]) -> Tensor:
    """:func:`fastbert.nn.attention_probs` with keys outside ``window`` masked as padding (for
    ``output_attentions``); q, k ``(batch, seqlen, heads, head_dim)`` -> ``(batch, heads, seqlen, seqlen)``."""
    if window is None:
        return attention_probs(q, k, attention_mask, softmax_scale)
    batch, seqlen = q.shape[:2]
    i = torch.arange(seqlen, device=q.device)
    band = ((i[None, :] >= i[:, None] - window[0]) & (i[None, :] <= i[:, None] + window[1]))  # [q, k]
    keep = band[None] if attention_mask is None else band[None] & (attention_mask != 0)[:, None, :]
    scores = softmax_scale * torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    has_key = keep[:, None].any(dim=-1, keepdim=True)
    return (torch.softmax(torch.where(has_key, scores, 0.0), dim=-1) * has_key).to(q.dtype)


class ModernBertAttention(OpsModule, nn.Module):
    """``Wo(attention(rotary(q, k), v))`` with ``q, k, v = Wqkv(x)`` split ``(3, heads, head_dim)``;
    a ``sliding_attention`` layer sees ``local_attention // 2`` keys each side.

    forward(hidden_states, attention_mask=None, *, rotary, position_ids=None, cu_seqlens=None,
    max_seqlen=None, output_attentions=False, probs_mask=None, indices=None) -> (out, probs or None).
    """

    # Rotate q, k in Wqkv's fresh output (rotary(inplace=True)) instead of into new tensors. Off
    # until an idle measurement says it pays: under a load of 25-30 on 2 cores it measured 0.86x-0.95x
    # with wide spread (benchmarks/rotary_inplace.py); the in-place path keeps the parity tests green
    # (tests/test_rotary_inplace.py flips it).
    rotary_inplace = False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        if hidden % heads:
            raise ValueError(f"hidden_size: expected a multiple of num_attention_heads ({heads}), got {hidden}")
        self.num_heads, self.head_dim = heads, hidden // heads
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_types[{layer_idx}]: expected one of {LAYER_TYPES}, got {self.layer_type!r}")
        half = config.local_attention // 2
        self.window = (half, half) if self.layer_type == "sliding_attention" else None
        self.dropout_p = float(config.attention_dropout)
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=config.attention_bias)
        self.Wo = nn.Linear(hidden, hidden, bias=config.attention_bias)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, *, rotary: dict,
                position_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, output_attentions: bool = False,
                probs_mask: Optional[Tensor] = None, indices: Optional[Tensor] = None):
        qkv = self.Wqkv(hidden_states).view(hidden_states.shape[:-1] + (3, self.num_heads, self.head_dim))
        # each [batch, seqlen, H, d] or [total, H, d]: views (select, not unbind: autograd lets a
        # single view be modified in place), rotated in Wqkv's fresh output buffer
        q, k, v = (qkv.select(-3, i) for i in range(3))
        cos, sin = rotary[self.layer_type]
        q, k = _rotary(q, k, cos, sin, position_ids, cu_seqlens, self.backend, self.rotary_inplace)
        p = self.dropout_p if self.training else 0.0
        out = attention(q, k, v, attention_mask=attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                        dropout_p=p, backend=self.backend, window=self.window)
        out = F.dropout(self.Wo(out.reshape(hidden_states.shape)), p, self.training)
        probs = None
        if output_attentions:
            scale = 1.0 / math.sqrt(self.head_dim)
            if cu_seqlens is None:
                probs = windowed_probs(q, k, attention_mask, scale, self.window)
            else:
                batch, seqlen = probs_mask.shape
                probs = windowed_probs(pad_input(q, indices, batch, seqlen), pad_input(k, indices, batch, seqlen),
                                       probs_mask, scale, self.window)
        return out, probs


def _rotary(q, k, cos, sin, position_ids, cu_seqlens, backend, inplace):
    if q.dim() == 3 and position_ids is None:  # positions restart per sequence
        return rotary(q, k, cos, sin, cu_seqlens=cu_seqlens, inplace=inplace, backend=backend)
    return rotary(q, k, cos, sin, position_ids=position_ids, inplace=inplace, backend=backend)


class ModernBertMLP(OpsModule, nn.Module):
    """``Wo(dropout(geglu(Wi(x))))``: GeGLU with ``hidden_activation`` (a GELU runs fused in
    :func:`fastbert.ops.geglu`, taking Wi's bias where the backend fuses it; another activation
    runs through torch as ``act(a) * g``)."""

    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.approximate, self.act_fn = resolve_activation(config.hidden_activation)
        self.dropout_p = float(config.mlp_dropout)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.act_fn is not None:
            a, g = self.Wi(hidden_states).chunk(2, dim=-1)
            h = self.act_fn(a) * g
        elif self.Wi.bias is not None and fuses_dense_bias(hidden_states, self.backend):
            h = geglu(F.linear(hidden_states, self.Wi.weight), bias=self.Wi.bias, approximate=self.approximate,
                      backend=self.backend)
        else:
            h = geglu(self.Wi(hidden_states), approximate=self.approximate, backend=self.backend)
        return self.Wo(F.dropout(h, self.dropout_p, self.training))


def modernbert_layer(config, layer_idx: int) -> PreNormLayer:
    """Layer ``layer_idx``: ``attn_norm`` (Identity for layer 0, as transformers), ``attn``,
    ``mlp_norm``, ``mlp``."""
    attn_norm = nn.Identity() if layer_idx == 0 else _norm(config, config.hidden_size)
    return PreNormLayer(attn_norm, ModernBertAttention(config, layer_idx), _norm(config, config.hidden_size),
                        ModernBertMLP(config))


class ModernBertPredictionHead(OpsModule, nn.Module):
    """``norm(act(dense(h)))`` (``classifier_activation``, ``classifier_bias``); a GELU fuses the
    dense bias where the backend pays for it."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.approximate, self.act_fn = resolve_activation(config.classifier_activation)
        self.norm = _norm(config, config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.norm(_dense_act(self, self.dense, hidden_states))


__all__ = ["ModernBertEmbeddings", "ModernBertAttention", "ModernBertMLP", "ModernBertPredictionHead",
           "RotaryTables", "modernbert_layer", "rope_tables", "windowed_probs"]
