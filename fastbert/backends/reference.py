"""Reference implementations: plain PyTorch that reads like the math; the arbiter of every parity test.

Built for clarity and fp64, not speed. Attention computes in its inputs' dtype (tests upcast the
inputs to get an fp32/fp64 reference); LayerNorm and GELU compute in fp32 (fp64 for fp64 input).
Backward formulas are written out (custom-op implementations run below autograd) and are checked
against torch autograd of independent implementations in the tests.

Sources: scaled dot-product attention, Vaswani et al. 2017, eq. (1); LayerNorm, Ba et al. 2016,
eqs. (3)-(4); GELU, Hendrycks & Gimpel 2016, sec. 2 (exact ``x * Phi(x)`` and its tanh form).
"""

from __future__ import annotations

import math

import torch

from fastbert.backends._philox import attention_keep_mask, dropout_scale, rows_keep_mask

# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale):
    """Heads-first q, k, v, the masked scores ``[B, H, Lq, Lk]`` and the has-key mask ``[B, H, Lq, 1]``.

    Excluded keys (padding, or a ``-inf`` bias) score ``-inf``; an empty row (no key at all) is
    filled with 0 before the softmax so neither it nor its gradient is NaN, and is zeroed after.
    """
    cdt = q.dtype
    # The seed's shapes, per sequence: x (L, D) -> Q, K, V (L, H, D/H) -> (H, L, D/H).
    qh, kh, vh = (t.to(cdt).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    scores = softmax_scale * (qh @ kh.transpose(-1, -2))  # [B, H, Lq, Lk]
    if attn_bias is not None:
        scores = scores + attn_bias.to(cdt)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(torch.bool)
    if attn_bias is not None:
        allowed = allowed & (attn_bias != float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)  # [B, H, Lq, 1]
    scores = torch.where(has_key, torch.where(allowed, scores, float("-inf")), 0.0)
    return qh, kh, vh, scores, has_key


def attention_math(q, k, v, *, attention_mask=None, attn_bias=None, dropout_p=0.0, seed=None,
                   softmax_scale, lengths=None):
    """Masked multi-head attention on the padded layout; returns ``(out, lse)``.

    q ``[batch, seqlen_q, num_heads, head_dim]``, k/v ``[batch, seqlen_k, num_heads, head_dim]``,
    attention_mask bool ``[batch, seqlen_k]`` (True = attend) or None, attn_bias broadcastable to
    ``[batch, num_heads, seqlen_q, seqlen_k]`` or None. Computes in q's dtype (upcast the inputs
    for an fp32/fp64 reference). ``out`` ``[batch, seqlen_q, num_heads, head_dim]``; ``lse`` fp32
    ``[batch, num_heads, seqlen_q]`` with ``+inf`` on empty rows (no key to attend).
    Differentiable and NaN-free for empty rows, also in the gradient. ``lengths`` (varlen only):
    the sequence lengths, so the dropout mask is drawn only where rows and keys are real.
    """
    cdt = q.dtype
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    qh, kh, vh, scores, has_key = _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale)
    lse = torch.logsumexp(scores.float(), dim=-1)  # [B, H, Lq]
    lse = torch.where(has_key.squeeze(-1), lse, float("inf"))
    probs = torch.softmax(scores, dim=-1) * has_key  # [B, H, Lq, Lk]
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, device=q.device,
                                   lengths=lengths)
        probs = probs * keep * dropout_scale(dropout_p)  # 1 / (1 - p rounded as the mask)
    out = probs.to(cdt) @ vh  # [B, H, Lq, d]: weighted sum of values
    return out.transpose(1, 2), lse


def _pad_varlen(x, cu_seqlens, max_seqlen):
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
    qp, mask = _pad_varlen(q, cu_seqlens, max_seqlen)
    kp, _ = _pad_varlen(k, cu_seqlens, max_seqlen)
    vp, _ = _pad_varlen(v, cu_seqlens, max_seqlen)
    out, lse = attention_math(qp, kp, vp, attention_mask=mask, lengths=_lengths(cu_seqlens, kw), **kw)
    return out[mask], lse.transpose(1, 2)[mask].transpose(0, 1)


def _attention(q, k, v, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
               softmax_scale):
    kw = dict(attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)
    if cu_seqlens is not None:
        return attention_varlen_math(q, k, v, cu_seqlens, max_seqlen, **kw)
    return attention_math(q, k, v, attention_mask=attention_mask, **kw)


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False):
    """Backend entry point (see ``fastbert.backends``): writes ``out`` and ``lse``."""
    o, l = _attention(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                      softmax_scale=softmax_scale)
    out.copy_(o)
    if lse.numel():
        lse.copy_(l)


def attention_math_bwd(dout, q, k, v, *, attention_mask=None, attn_bias=None, dropout_p=0.0,
                       seed=None, softmax_scale, lengths=None):
    """Gradients of :func:`attention_math` on the padded layout; returns ``(dq, dk, dv, dscores)``.

    Recomputes P, then (Z = keep mask * dropout_scale(p), D = rowsum(dO * O)):
      dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - D),
      dQ = scale * dS K,   dK = scale * dS^T Q,  d(attn_bias) = dS (fp32, [B, H, Lq, Lk]).
    Empty rows have P = 0, so they pass exact zeros.
    """
    cdt = q.dtype
    batch, seqlen_q, num_heads, _ = q.shape
    seqlen_k = k.shape[1]
    qh, kh, vh, scores, has_key = _masked_scores(q, k, v, attention_mask, attn_bias, softmax_scale)
    do = dout.to(cdt).transpose(1, 2)  # [B, H, Lq, d]
    probs = torch.softmax(scores, dim=-1) * has_key  # [B, H, Lq, Lk]
    zscale = torch.ones((), dtype=cdt, device=q.device)
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, device=q.device,
                                   lengths=lengths)
        zscale = (keep * dropout_scale(dropout_p)).to(cdt)  # keep the low-precision dtype (matmuls below)
    dv = (probs * zscale).to(cdt).transpose(-1, -2) @ do  # [B, H, Lk, d]
    dprobs = (do @ vh.transpose(-1, -2)) * zscale  # [B, H, Lq, Lk]
    delta = (dprobs * probs).sum(dim=-1, keepdim=True)  # = rowsum(dO * O)
    dscores = probs * (dprobs - delta)
    dq = softmax_scale * (dscores @ kh)
    dk = softmax_scale * (dscores.transpose(-1, -2) @ qh)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dscores


def attention_varlen_math_bwd(dout, q, k, v, cu_seqlens, max_seqlen, **kw):
    """Varlen gradients by padding to ``max_seqlen``; returns ``(dq, dk, dv)``."""
    padded = [_pad_varlen(t, cu_seqlens, max_seqlen) for t in (dout, q, k, v)]
    mask = padded[0][1]
    dq, dk, dv, _ = attention_math_bwd(*(t for t, _ in padded), attention_mask=mask,
                                       lengths=_lengths(cu_seqlens, kw), **kw)
    return dq[mask], dk[mask], dv[mask]


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False):
    """Backend entry point: writes dq, dk, dv and (when asked) the full fp32 dbias."""
    kw = dict(attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)
    if cu_seqlens is not None:
        grads = attention_varlen_math_bwd(dout, q, k, v, cu_seqlens, max_seqlen, **kw)
    else:
        grads = attention_math_bwd(dout, q, k, v, attention_mask=attention_mask, **kw)
    dq.copy_(grads[0])
    dk.copy_(grads[1])
    dv.copy_(grads[2])
    if dbias is not None:
        dbias.copy_(grads[3])


# ----------------------------------------------------------------------------------------------
# LayerNorm with BERT's add & norm: y = LN(dropout(x + x_bias) + residual)
# ----------------------------------------------------------------------------------------------


def add_dropout_residual(x, residual=None, x_bias=None, dropout_p=0.0, seed=None):
    """``h = dropout(x + x_bias) + residual`` on ``[rows, hidden]`` (the pre-norm sum)."""
    h = x if x_bias is None else x + x_bias
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
        h = h * keep * dropout_scale(dropout_p)
    if residual is not None:
        h = h + residual
    return h


def layer_norm_math(h, weight, bias, eps):
    """LayerNorm over the last dim (Ba et al. 2016): ``(h - mean) / sqrt(var + eps) * w + b``.

    Statistics in fp32 (fp64 for fp64 input) with the two-pass variance ``mean((h - mean)^2)``;
    returns ``(y, mean, rstd)`` with y in h's dtype and mean/rstd ``[rows]`` in the statistics dtype.
    """
    stat_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf = h.to(stat_dtype)
    mean = hf.mean(dim=-1, keepdim=True)
    var = ((hf - mean) ** 2).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (hf - mean) * rstd
    if weight is not None:
        y = y * weight.to(stat_dtype)
    if bias is not None:
        y = y + bias.to(stat_dtype)
    return y.to(h.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Backend entry point: writes y, mean, rstd and (when fused) the pre-norm sum h."""
    hh = add_dropout_residual(x, residual, x_bias, dropout_p, seed)
    yy, m, r = layer_norm_math(hh, weight, bias, eps)
    y.copy_(yy)
    mean.copy_(m)
    rstd.copy_(r)
    if h is not None:
        h.copy_(hh)


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
                   seed):
    """Backend entry point.

    With xhat = (h - mean) * rstd and g = dy * weight (per row, n = hidden):
      dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
      dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)
      dresidual = dh, dx = dh * keep * dropout_scale(p), dx_bias = sum_rows(dx)
    """
    stat_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf, dyf = h.to(stat_dtype), dy.to(stat_dtype)
    xhat = (hf - mean.to(stat_dtype)[:, None]) * rstd.to(stat_dtype)[:, None]
    g = dyf if weight is None else dyf * weight.to(stat_dtype)
    dh = rstd.to(stat_dtype)[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dweight is not None:
        dweight.copy_((dyf * xhat).sum(0))
    if dbias is not None:
        dbias.copy_(dyf.sum(0))
    if dresidual is not None:
        dresidual.copy_(dh)
    dxf = dh
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, h.shape[0], h.shape[1], device=h.device)
        dxf = dh * keep * dropout_scale(dropout_p)
    dx.copy_(dxf)
    if dx_bias is not None:
        dx_bias.copy_(dxf.sum(0))


# ----------------------------------------------------------------------------------------------
# GELU with bias
# ----------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_math(x, approximate="none"):
    """GELU (Hendrycks & Gimpel 2016): ``x * Phi(x)`` exactly, or the tanh approximation
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    ``Phi(x) = 0.5 erfc(-x / sqrt(2))`` and ``0.5 (1 + tanh(u)) = sigmoid(2 u)``: the same values
    without the cancellation of ``1 + erf`` / ``1 + tanh`` that loses every digit in fp32 for x < -4.
    """
    if approximate == "tanh":
        return x * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * x * torch.erfc(-x / math.sqrt(2.0))


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(x + bias)`` computed in fp32 (fp64 for fp64)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    y.copy_(gelu_math(z, approximate))


def gelu_grad_math(z, approximate="none"):
    """d gelu / dz: ``Phi(z) + z phi(z)`` exactly, or the derivative of the tanh form."""
    if approximate == "tanh":  # with s = sigmoid(2u) = 0.5 (1 + tanh u): d/dz z s = s + 2 z s (1 - s) u'
        s = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))
        return s + 2.0 * z * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def gelu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: dx = dy * gelu'(x + bias); dbias = sum_rows(dx) in fp32."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    gz = dy.to(cdt) * gelu_grad_math(z, approximate)
    dx.copy_(gz)
    if dbias is not None:
        dbias.copy_(gz.sum(0))
