"""BERT encoder blocks on fastbert ops, with Hugging Face's module names (so state_dict keys match).

Each block takes a config object with Hugging Face's field names (``hidden_size``,
``num_attention_heads``, ``intermediate_size``, ``hidden_act``, ``hidden_dropout_prob``,
``attention_probs_dropout_prob``, ``layer_norm_eps``), e.g. ``transformers.BertConfig`` (any object
with those attributes: nn/ does not import transformers). DistilBERT's block reads its own names
(``dim``, ``n_heads``, ``hidden_dim``, ``activation``, ``dropout``, ``attention_dropout``).

Layouts: padded ``(batch, seqlen, hidden)`` with an optional ``attention_mask`` ``(batch, seqlen)``
(nonzero = attend), or packed ``(total_tokens, hidden)`` with ``cu_seqlens`` ``(batch + 1,)``
int32 and ``max_seqlen`` (see :mod:`fastbert.nn.padding`).

Fusions: residual, dropout and LayerNorm run as one ``layer_norm(x, residual=..., dropout_p=...)``
(BERT's add & norm). Where the backend declares that it pays (:func:`fastbert.ops.fuses_dense_bias`:
Triton, CUDA), a dense layer runs without its bias, which moves into the op that follows
(``x_bias=dense.bias``, ``gelu(x, bias=dense.bias)``); on the torch backend the bias stays in the
GEMM (``addmm``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.nn.modules import LayerNorm, OpsModule, resolve_activation
from fastbert.nn.padding import pad_input
from fastbert.ops import attention, fuses_dense_bias, gelu, layer_norm


def attention_probs(q: Tensor, k: Tensor, attention_mask: Optional[Tensor], softmax_scale: float,
                    window: Optional[tuple[int, int]] = None) -> Tensor:
    """Attention probabilities ``softmax(softmax_scale * q k^T)`` over the keys, for ``output_attentions``.

    q, k ``(batch, seqlen, num_heads, head_dim)``; attention_mask ``(batch, seqlen)`` or None;
    window ``(left, right)`` or None (as :func:`fastbert.ops.attention`).
    Returns ``(batch, num_heads, seqlen, seqlen)`` in q's dtype (fp32 math); masked keys get 0; a
    row with no key returns zeros (Hugging Face's eager path averages instead). Before dropout.
    """
    scores = softmax_scale * torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())
    keep = None
    if attention_mask is not None:
        keep = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, Lk]
    if window is not None:
        i, j = torch.arange(q.shape[1], device=q.device)[:, None], torch.arange(k.shape[1], device=q.device)
        band = (j >= i - window[0]) & (j <= i + window[1])  # [Lq, Lk]
        keep = band if keep is None else keep & band
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
        has_key = keep.any(dim=-1, keepdim=True)
        scores = torch.where(has_key, scores, 0.0)
        return (torch.softmax(scores, dim=-1) * has_key).to(q.dtype)
    return torch.softmax(scores, dim=-1).to(q.dtype)


def _dense_add_norm(module, hidden_states: Tensor, input_tensor: Tensor, dense=None, norm=None,
                    dropout_p=None) -> Tensor:
    """``LayerNorm(dropout(dense(h)) + input)`` with the dense bias, dropout and residual fused
    (``module.dense`` / ``module.LayerNorm`` / ``module.dropout_p`` unless given)."""
    dense = module.dense if dense is None else dense
    norm = module.LayerNorm if norm is None else norm
    p = (module.dropout_p if dropout_p is None else dropout_p) if module.training else 0.0
    if fuses_dense_bias(hidden_states, module.backend):
        h, x_bias = F.linear(hidden_states, dense.weight), dense.bias
    else:  # the bias rides in the GEMM (addmm)
        h, x_bias = F.linear(hidden_states, dense.weight, dense.bias), None
    return layer_norm(h, norm.weight, norm.bias, eps=norm.eps, x_bias=x_bias, residual=input_tensor,
                      dropout_p=p, backend=module.backend)


def _dense_act(module, dense: nn.Linear, hidden_states: Tensor) -> Tensor:
    """``act(dense(x))`` of ``module`` (``approximate``, ``act_fn`` from :func:`resolve_activation`);
    a GELU fuses the dense bias into ``fastbert.ops.gelu``."""
    if module.act_fn is not None:  # a non-GELU activation runs through torch
        return module.act_fn(dense(hidden_states))
    if fuses_dense_bias(hidden_states, module.backend):
        return gelu(F.linear(hidden_states, dense.weight), bias=dense.bias, approximate=module.approximate,
                    backend=module.backend)
    return gelu(dense(hidden_states), approximate=module.approximate, backend=module.backend)  # addmm


def self_attention(module, hidden_states: Tensor, projections, attention_mask: Optional[Tensor] = None, *,
                   cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                   output_attentions: bool = False, probs_mask: Optional[Tensor] = None,
                   indices: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Multi-head self-attention (Vaswani et al. 2017, eq. 1) of ``module`` (``num_attention_heads``,
    ``attention_head_size``, ``dropout_p``, ``backend`` and, when it has one, a local ``window``
    ``(left, right)``) with the query/key/value Linear layers ``projections``; shapes as
    :class:`BertSelfAttention`."""
    # Three GEMMs straight from the parameters: concatenating the weights into one fused QKV
    # GEMM copies 3 * hidden^2 weights per layer and call, which costs more on CPU than the
    # larger GEMM saves. attention() takes any strides, so q, k, v are views, never copied.
    heads = (module.num_attention_heads, module.attention_head_size)
    q, k, v = (F.linear(hidden_states, lin.weight, lin.bias).view(hidden_states.shape[:-1] + heads)
               for lin in projections)  # each [batch, seqlen, H, d] or [total, H, d]
    p = module.dropout_p if module.training else 0.0
    window = getattr(module, "window", None)
    out = attention(q, k, v, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                    max_seqlen=max_seqlen, dropout_p=p, backend=module.backend, window=window)
    probs = None
    if output_attentions:
        scale = 1.0 / math.sqrt(module.attention_head_size)
        if cu_seqlens is None:
            probs = attention_probs(q, k, attention_mask, scale, window)
        else:
            if probs_mask is None or indices is None:
                raise ValueError("probs_mask, indices: output_attentions in the packed layout needs both "
                                 "(the padded (batch, seqlen) mask and unpad_metadata's indices)")
            batch, seqlen = probs_mask.shape
            probs = attention_probs(pad_input(q, indices, batch, seqlen), pad_input(k, indices, batch, seqlen),
                                    probs_mask, scale, window)
    return out.reshape(hidden_states.shape), probs


def _heads(module, hidden_size: int, num_heads: int, dropout_p: float) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: expected a multiple of num_attention_heads ({num_heads}), got {hidden_size}")
    module.num_attention_heads, module.attention_head_size = num_heads, hidden_size // num_heads
    module.dropout_p = dropout_p


class BertSelfAttention(OpsModule, nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, eq. 1); query/key/value are separate Linear
    layers (Hugging Face's keys).

    forward(hidden_states, attention_mask=None, *, cu_seqlens=None, max_seqlen=None,
    output_attentions=False, probs_mask=None, indices=None) -> (context, probs)

    hidden_states ``(batch, seqlen, hidden)`` (padded) or ``(total_tokens, hidden)`` (packed, with
    cu_seqlens/max_seqlen). context has hidden_states' shape. probs ``(batch, num_heads, seqlen,
    seqlen)`` when ``output_attentions``, else None; in the packed layout they need ``probs_mask``
    ``(batch, seqlen)`` and ``indices`` to lay the tokens out padded.

    ``window``: None (global) or a local window ``(left, right)`` as in :func:`fastbert.ops.attention`;
    an attribute, so a model may set it per layer.
    """

    window: Optional[tuple[int, int]] = None

    def __init__(self, config, *, window: Optional[tuple[int, int]] = None):
        super().__init__()
        _heads(self, config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob)
        self.window = window
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        return self_attention(self, hidden_states, (self.query, self.key, self.value), attention_mask, **kw)


class BertSelfOutput(OpsModule, nn.Module):
    """``LayerNorm(dropout(dense(context)) + input)``: bias, dropout, residual and LN fused."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return _dense_add_norm(self, hidden_states, input_tensor)


class BertAttention(nn.Module):
    """Self-attention followed by its output projection and add & norm."""

    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        context, probs = self.self(hidden_states, attention_mask, **kw)
        return self.output(context, hidden_states), probs


class BertIntermediate(OpsModule, nn.Module):
    """``act(dense(x))``; a GELU ``hidden_act`` fuses the dense bias into ``fastbert.ops.gelu``."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate, self.act_fn = resolve_activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return _dense_act(self, self.dense, hidden_states)


class BertOutput(OpsModule, nn.Module):
    """``LayerNorm(dropout(dense(intermediate)) + attention_output)``, fused."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return _dense_add_norm(self, hidden_states, input_tensor)


class BertLayer(nn.Module):
    """One encoder layer: attention + add & norm, then feed-forward + add & norm.

    forward(hidden_states, attention_mask=None, **kw) -> (hidden_states, probs or None); ``kw`` as
    :class:`BertSelfAttention` (``cu_seqlens``, ``max_seqlen`` for the packed layout).
    """

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        attention_output, probs = self.attention(hidden_states, attention_mask, **kw)
        return self.output(self.intermediate(attention_output), attention_output), probs


# ---- DistilBERT's block (Sanh et al. 2019): BERT's post-norm layer under other module names ----


class DistilBertSelfAttention(OpsModule, nn.Module):
    """``out_lin(attention(q_lin(x), k_lin(x), v_lin(x)))``; config fields ``dim``, ``n_heads``,
    ``attention_dropout``. forward as :class:`BertSelfAttention` but projected by ``out_lin``;
    ``window`` likewise."""

    window: Optional[tuple[int, int]] = None

    def __init__(self, config, *, window: Optional[tuple[int, int]] = None):
        super().__init__()
        _heads(self, config.dim, config.n_heads, config.attention_dropout)
        self.window = window
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(config.dim, config.dim) for _ in range(4))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        return self_attention(self, hidden_states, (self.q_lin, self.k_lin, self.v_lin), attention_mask, **kw)


class DistilBertFFN(OpsModule, nn.Module):
    """``lin2(act(lin1(x)))`` (``hidden_dim``, ``activation``); lin2, its dropout, the residual and
    the LayerNorm run fused in :class:`DistilBertBlock`."""

    def __init__(self, config):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.approximate, self.act_fn = resolve_activation(config.activation)


class DistilBertBlock(OpsModule, nn.Module):
    """``sa = LN(out_lin(attn(x)) + x)`` (no dropout on out_lin), ``LN(dropout(lin2(act(lin1(sa)))) + sa)``;
    LayerNorm eps 1e-12 (DistilBERT's constant). Block protocol as :class:`BertLayer`."""

    def __init__(self, config):
        super().__init__()
        self.attention = DistilBertSelfAttention(config)
        self.sa_layer_norm = LayerNorm(config.dim, eps=1e-12)
        self.ffn = DistilBertFFN(config)
        self.output_layer_norm = LayerNorm(config.dim, eps=1e-12)
        self.dropout_p = config.dropout

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        context, probs = self.attention(hidden_states, attention_mask, **kw)
        sa = _dense_add_norm(self, context, hidden_states, self.attention.out_lin, self.sa_layer_norm, 0.0)
        h = _dense_act(self.ffn, self.ffn.lin1, sa)
        return _dense_add_norm(self, h, sa, self.ffn.lin2, self.output_layer_norm), probs
