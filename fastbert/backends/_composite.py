"""The composite math of fastbert's ops: plain PyTorch that reads like the math, fp64-capable.

Shared by two backends, which is why it lives here and not in either of them: the ``reference``
backend is these functions (the arbiter of every parity test), and the ``torch`` backend falls back
to them where aten has no fused call (dropout's shared keep mask, fp16/bf16 GELU, ill-conditioned
LayerNorm rows). See ``fastbert.backends.reference`` for the numerics and the sources.

One module per op: attention here, LayerNorm in :mod:`._composite_layer_norm`, GELU and GeGLU in
:mod:`._composite_gelu`, rotary in :mod:`._composite_rotary` (dtype helpers in
:mod:`._composite_common`); every name is re-exported here, the one place both backends import.
"""

from __future__ import annotations

import torch

from fastbert.backends._composite_common import acc_dtype, round_to
from fastbert.backends._composite_gelu import (  # noqa: F401  (re-exported)
    geglu_bwd, geglu_fwd, gelu_bwd, gelu_fwd, gelu_grad_math, gelu_math,
)
from fastbert.backends._composite_layer_norm import (  # noqa: F401  (re-exported)
    add_dropout_residual, layer_norm_bwd, layer_norm_dh, layer_norm_fwd, layer_norm_math,
)
from fastbert.backends._composite_rotary import (  # noqa: F401  (re-exported)
    rotary_bwd, rotary_fwd, rotary_math, rotate_half, rotate_pairs,
)
from fastbert.backends._philox import attention_keep_mask, dropout_scale

# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def window_mask(seqlen_q: int, seqlen_k: int, window, device=None) -> torch.Tensor:
    """Bool ``[seqlen_q, seqlen_k]``: True where query row ``i`` may see key ``j`` under a local
    ``window = (left, right)``, i.e. ``i - left <= j <= i + right`` (top-left aligned indices)."""
    left, right = window
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return (j >= i - left) & (j <= i + right)


def _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale, window=None):
    """Heads-first q, k, v, the masked scores ``[B, H, Lq, Lk]`` and the has-key mask
    ``[B, H, Lq, 1]``, all in the accumulation dtype (fp32; fp64 for fp64 inputs).

    Scores ``softmax_scale * q k^T + attn_bias`` are computed there whatever q's and the bias's
    dtypes (an fp16 q with an fp32 bias of -1e5 keeps the exact softmax of its finite scores; a row
    all biased ``finfo.min`` has equal scores and averages V). Excluded keys (padding, or a ``-inf``
    bias) score ``-inf``, by replacement; keys masked by ``attention_mask`` are replaced by zero K
    and V rows, so whatever they hold (NaN, Inf) has no influence, in the gradients too. An empty
    row (no key at all) is filled with 0 before the softmax so neither it nor its gradient is NaN,
    and is zeroed after. Keys outside a local ``window`` (:func:`window_mask`) score ``-inf`` by
    replacement too (their K and V rows meet other rows' windows, so they stay in the products).
    """
    acc = acc_dtype(q.dtype)
    # The seed's shapes, per sequence: x (L, D) -> Q, K, V (L, H, D/H) -> (H, L, D/H).
    qh, kh, vh = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    allowed = torch.ones((), dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        key_ok = attention_mask[:, None, :, None].to(torch.bool)  # [B, 1, Lk, 1]
        kh, vh = (torch.where(key_ok, t, 0.0) for t in (kh, vh))
        allowed = key_ok.transpose(-1, -2)  # [B, 1, 1, Lk]
    scores = softmax_scale * (qh @ kh.transpose(-1, -2))  # [B, H, Lq, Lk]
    if attn_bias is not None:
        scores = scores + attn_bias.to(acc)
        allowed = allowed & (attn_bias != float("-inf"))
    if window is not None:
        allowed = allowed & window_mask(q.shape[1], k.shape[1], window, q.device)  # [Lq, Lk]
    allowed = allowed.expand(scores.shape)
    has_key = allowed.any(dim=-1, keepdim=True)  # [B, H, Lq, 1]
    scores = torch.where(has_key, torch.where(allowed, scores, float("-inf")), 0.0)
    return qh, kh, vh, scores, has_key


def attention_math(q, k, v, *, attention_mask=None, attn_bias=None, dropout_p=0.0, seed=None,
                   softmax_scale, lengths=None, window=None, first_sequence=0):
    """Masked multi-head attention on the padded layout; returns ``(out, lse)``.

    q ``[batch, seqlen_q, num_heads, head_dim]``, k/v ``[batch, seqlen_k, num_heads, head_dim]``,
    attention_mask bool ``[batch, seqlen_k]`` (True = attend) or None, attn_bias broadcastable to
    ``[batch, num_heads, seqlen_q, seqlen_k]`` (any float dtype) or None. Scores, softmax and the
    products accumulate in fp32 (fp64 for fp64 q), P is rounded to q's dtype before ``P @ V`` (the
    contract's numerics); upcast the inputs for an fp64 reference. ``out`` in q's dtype
    ``[batch, seqlen_q, num_heads, head_dim]``; ``lse`` fp32 ``[batch, num_heads, seqlen_q]`` with
    ``+inf`` on empty rows (no key to attend). Differentiable and NaN-free for empty rows, also in
    the gradient. ``lengths`` (varlen only): the sequence lengths, so the dropout mask is drawn
    only where rows and keys are real. ``window``: None or a local window ``(left, right)`` (see
    :func:`window_mask`). ``first_sequence``: the logical index of sequence 0 in the dropout
    counters (a run of sequences computed on its own).
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    qh, kh, vh, scores, has_key = _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale, window)
    lse = torch.logsumexp(scores, dim=-1).float()  # [B, H, Lq]
    lse = torch.where(has_key.squeeze(-1), lse, float("inf"))
    probs = torch.softmax(scores, dim=-1) * has_key  # [B, H, Lq, Lk]
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, device=q.device,
                                   lengths=lengths, first_sequence=first_sequence)
        probs = probs.mul_(keep).mul_(dropout_scale(dropout_p))  # 1 / (1 - p rounded as the mask); in place
    out = round_to(probs, q.dtype) @ vh  # [B, H, Lq, d]: weighted sum of values
    return out.transpose(1, 2).to(q.dtype), lse


def pad_varlen(x, cu_seqlens, max_seqlen):
    """[total, ...] -> [batch, max_seqlen, ...] zero-padded, plus the bool mask [batch, max_seqlen]."""
    batch = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pos = torch.arange(max_seqlen, device=x.device)
    mask = pos[None, :] < lengths[:, None]  # [B, L]
    padded = x.new_zeros((batch, max_seqlen) + tuple(x.shape[1:]))
    padded[mask] = x
    return padded, mask


def _lengths(cu_seqlens, kw):
    """Sequence lengths for the dropout mask (read on the CPU only: no host sync elsewhere)."""
    if kw.get("dropout_p", 0.0) > 0.0 and cu_seqlens.device.type == "cpu":
        return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return None


def attention_varlen_math(q, k, v, cu_seqlens, max_seqlen, **kw):
    """Varlen attention by padding each sequence to ``max_seqlen``; returns ``(out, lse)``.

    q/k/v ``[total_tokens, num_heads, head_dim]``, cu_seqlens ``[batch + 1]`` int32;
    out ``[total_tokens, num_heads, head_dim]``, lse fp32 ``[num_heads, total_tokens]``.
    """
    qp, mask = pad_varlen(q, cu_seqlens, max_seqlen)
    kp, _ = pad_varlen(k, cu_seqlens, max_seqlen)
    vp, _ = pad_varlen(v, cu_seqlens, max_seqlen)
    out, lse = attention_math(qp, kp, vp, attention_mask=mask, lengths=_lengths(cu_seqlens, kw), **kw)
    return out[mask], lse.transpose(1, 2)[mask].transpose(0, 1)


def _attention(q, k, v, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
               softmax_scale, window=None):
    kw = dict(attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale, window=window)
    if cu_seqlens is not None:
        return attention_varlen_math(q, k, v, cu_seqlens, max_seqlen, **kw)
    return attention_math(q, k, v, attention_mask=attention_mask, **kw)


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False, window=None):
    """Backend entry point (see ``fastbert.backends``): writes ``out`` and ``lse``."""
    o, l = _attention(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                      softmax_scale=softmax_scale, window=window)
    out.copy_(o)
    if lse.numel():  # the two planes (m, log l): the whole logsumexp in m, log l = 0
        lse[0].copy_(l)
        lse[1].zero_()


def attention_math_bwd(dout, q, k, v, *, attention_mask=None, attn_bias=None, dropout_p=0.0,
                       seed=None, softmax_scale, lengths=None, window=None, first_sequence=0):
    """Gradients of :func:`attention_math` on the padded layout; returns ``(dq, dk, dv, dscores)``.

    Recomputes P, then (Z = keep mask * dropout_scale(p), D = rowsum(dO * O)):
      dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - D),
      dQ = scale * dS K,   dK = scale * dS^T Q,  d(attn_bias) = dS (fp32, [B, H, Lq, Lk]).
    In the accumulation dtype, with P * Z and dS rounded to q's dtype before their products (as
    the kernels do). Empty rows have P = 0, so they pass exact zeros; masked keys were replaced by
    zero rows, so their dK and dV are exact zeros too; outside a ``window`` P = 0, so dS = 0 there.
    """
    batch, seqlen_q, num_heads, _ = q.shape
    seqlen_k = k.shape[1]
    qh, kh, vh, scores, has_key = _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale, window)
    do = dout.to(scores.dtype).transpose(1, 2)  # [B, H, Lq, d]
    probs = torch.softmax(scores, dim=-1) * has_key  # [B, H, Lq, Lk]
    zscale = torch.ones((), dtype=scores.dtype, device=q.device)
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, device=q.device,
                                   lengths=lengths, first_sequence=first_sequence)
        zscale = keep.to(scores.dtype) * dropout_scale(dropout_p)  # (bool * float would round it to fp32)
    dv = round_to(probs * zscale, q.dtype).transpose(-1, -2) @ do  # [B, H, Lk, d]
    dprobs = (do @ vh.transpose(-1, -2)) * zscale  # [B, H, Lq, Lk]
    delta = (dprobs * probs).sum(dim=-1, keepdim=True)  # = rowsum(dO * O)
    dscores = probs * (dprobs - delta)
    ds = round_to(dscores, q.dtype)
    dq = softmax_scale * (ds @ kh)
    dk = softmax_scale * (ds.transpose(-1, -2) @ qh)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dscores


def attention_varlen_math_bwd(dout, q, k, v, cu_seqlens, max_seqlen, **kw):
    """Varlen gradients by padding to ``max_seqlen``; returns ``(dq, dk, dv)``."""
    padded = [pad_varlen(t, cu_seqlens, max_seqlen) for t in (dout, q, k, v)]
    mask = padded[0][1]
    dq, dk, dv, _ = attention_math_bwd(*(t for t, _ in padded), attention_mask=mask,
                                       lengths=_lengths(cu_seqlens, kw), **kw)
    return dq[mask], dk[mask], dv[mask]


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False, window=None):
    """Backend entry point: writes dq, dk, dv and (when asked) the full fp32 dbias."""
    kw = dict(attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale, window=window)
    if cu_seqlens is not None:
        grads = attention_varlen_math_bwd(dout, q, k, v, cu_seqlens, max_seqlen, **kw)
    else:
        grads = attention_math_bwd(dout, q, k, v, attention_mask=attention_mask, **kw)
    dq.copy_(grads[0])
    dk.copy_(grads[1])
    dv.copy_(grads[2])
    if dbias is not None:
        dbias.copy_(grads[3])
