"""The composite math of fastbert's ops: plain PyTorch that reads like the math, fp64-capable.

Shared by two backends, which is why it lives here and not in either of them: the ``reference``
backend is these functions (the arbiter of every parity test), and the ``torch`` backend falls back
to them where aten has no fused call (dropout's shared keep mask, fp16/bf16 GELU, ill-conditioned
LayerNorm rows). See ``fastbert.backends.reference`` for the numerics and the sources.
"""

from __future__ import annotations

import math

import torch

from fastbert.backends._philox import attention_keep_mask, dropout_scale, rows_keep_mask

# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (the contract's numerics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def round_to(x, dtype):
    """``x`` rounded to ``dtype`` and back: where the kernels feed a low-precision operand to a
    matrix product (P before ``P @ V``, dS before ``dS @ K``), accumulating in fp32."""
    return x.to(dtype).to(x.dtype)


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


# ----------------------------------------------------------------------------------------------
# LayerNorm with BERT's add & norm: y = LN(dropout(x + x_bias) + residual)
# ----------------------------------------------------------------------------------------------


def _stat_dtype(t):
    """LayerNorm's compute / statistics dtype: fp32, fp64 for fp64 input."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def add_dropout_residual(x, residual=None, x_bias=None, dropout_p=0.0, seed=None):
    """``h = dropout(x + x_bias) + residual`` on ``[rows, hidden]`` (the pre-norm sum), computed in
    fp32 (fp64 for fp64 x) and rounded once to x's dtype, as the kernels store it; the scale is
    the multiplier ``1 / (1 - p)`` they use."""
    if x_bias is None and residual is None and dropout_p == 0.0:
        return x
    h = x.to(_stat_dtype(x))
    if x_bias is not None:
        h = h + x_bias.to(h.dtype)
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
        h = h * keep * dropout_scale(dropout_p)
    if residual is not None:
        h = h + residual.to(h.dtype)
    return h.to(x.dtype)


def layer_norm_math(h, weight, bias, eps):
    """LayerNorm over the last dim (Ba et al. 2016): ``(h - mean) / sqrt(var + eps) * w + b``.

    Statistics in fp32 (fp64 for fp64 input) with the two-pass variance ``mean((h - mean)^2)``;
    returns ``(y, mean, rstd)`` with y in h's dtype and mean/rstd ``[rows]`` in the statistics dtype.
    """
    stat_dtype = _stat_dtype(h)
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


def layer_norm_dh(dy, h, weight, mean, rstd):
    """``(dh, xhat, dy)`` in the statistics dtype for rows of h with their saved mean / rstd:
    ``dh = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``xhat = (h - mean) * rstd``,
    ``g = dy * weight``. xhat is formed before it multiplies anything, so a row with a large mean
    and a tiny variance loses nothing to cancellation."""
    stat_dtype = _stat_dtype(h)
    hf, dyf = h.to(stat_dtype), dy.to(stat_dtype)
    r = rstd.to(stat_dtype)[:, None]
    xhat = (hf - mean.to(stat_dtype)[:, None]) * r
    g = dyf if weight is None else dyf * weight.to(stat_dtype)
    dh = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dh, xhat, dyf


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
                   seed):
    """Backend entry point.

    With xhat = (h - mean) * rstd and g = dy * weight (per row, n = hidden):
      dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
      dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)
      dresidual = dh, dx = dh * keep * dropout_scale(p), dx_bias = sum_rows(dx)
    """
    dh, xhat, dyf = layer_norm_dh(dy, h, weight, mean, rstd)
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


# ----------------------------------------------------------------------------------------------
# GeGLU: y = gelu(x[:, :n] + b[:n]) * (x[:, n:] + b[n:])  (Shazeer 2020, eq. 6 with GELU)
# ----------------------------------------------------------------------------------------------


def _geglu_halves(x, bias, cdt):
    """``(a, g)``: the GELU input and the gate, each ``[rows, n]`` in ``cdt``, biases added."""
    n = x.shape[-1] // 2
    xf = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    return xf[:, :n], xf[:, n:]


def geglu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(a) * g`` with ``a, g = (x + bias)`` split in halves, in fp32
    (fp64 for fp64)."""
    a, g = _geglu_halves(x, bias, acc_dtype(x.dtype))
    y.copy_(gelu_math(a, approximate) * g)


def geglu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point. With ``y = gelu(a) * g``: ``da = dy * g * gelu'(a)``, ``dg = dy * gelu(a)``;
    ``dx = [da, dg]``, ``dbias = sum_rows(dx)`` in fp32 (fp64 for fp64)."""
    cdt = acc_dtype(x.dtype)
    a, g = _geglu_halves(x, bias, cdt)
    dyf = dy.to(cdt)
    d = torch.cat((dyf * g * gelu_grad_math(a, approximate), dyf * gelu_math(a, approximate)), dim=-1)
    dx.copy_(d)
    if dbias is not None:
        dbias.copy_(d.sum(0))


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE; Su et al. 2021, eq. 34)
# ----------------------------------------------------------------------------------------------


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` over the last dim (GPT-NeoX / ModernBERT layout: first half, second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x):
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the RoPE paper's interleaved pairs."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_math(x, cos, sin, positions, interleaved=False):
    """``x * C + rot(x) * S`` on the first ``rotary_dim = 2 * cos.shape[1]`` features of each head,
    the rest passed through; computed in fp32 (fp64 for fp64 x).

    x ``[batch, seqlen, heads, head_dim]`` or ``[total, heads, head_dim]``; positions int
    ``[batch, seqlen]`` / ``[total]``; cos/sin ``[max_positions, rotary_dim / 2]``. ``C`` / ``S`` are
    the tables at each token's position widened to ``rotary_dim``: each frequency twice, as
    ``[c, c]`` (rotate_half layout) or ``[c0, c0, c1, c1, ...]`` (interleaved).
    """
    cdt = acc_dtype(x.dtype)
    r = 2 * cos.shape[-1]
    c = cos.to(cdt)[positions].unsqueeze(-2)  # [..., 1, r/2]: the same rotation for every head
    s = sin.to(cdt)[positions].unsqueeze(-2)
    if interleaved:
        big_c, big_s, rot = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1), rotate_pairs
    else:
        big_c, big_s, rot = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1), rotate_half
    xr = x[..., :r].to(cdt)
    return torch.cat((xr * big_c + rot(xr) * big_s, x[..., r:].to(cdt)), dim=-1)


def rotary_fwd(q, k, cos, sin, q_out, k_out, *, positions, interleaved):
    """Backend entry point: rotate q and k by each token's angles into q_out / k_out (which may be
    q / k themselves: the rotation is computed out of place, then copied)."""
    q_out.copy_(rotary_math(q, cos, sin, positions, interleaved))
    k_out.copy_(rotary_math(k, cos, sin, positions, interleaved))


def rotary_bwd(dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved):
    """Backend entry point: the rotation is orthogonal, so the gradient is the inverse rotation
    ``R(-theta) dy``: the forward with ``-sin``."""
    rotary_fwd(dq_out, dk_out, cos, -sin, dq, dk, positions=positions, interleaved=interleaved)
