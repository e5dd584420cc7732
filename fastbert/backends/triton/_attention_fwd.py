"""Triton attention forward kernel and its launch arguments.

The tiled online softmax of FlashAttention-2 (Dao 2023, Algorithm 1). Each program owns
``BLOCK_M`` query rows of one (sequence, head) and walks the key blocks once, keeping per row in
fp32 the running max ``m`` and the running sum ``l`` of ``exp(s - m)``; a new key block with row
max ``m'`` = max(m, rowmax(S)) rescales the state by ``alpha = exp(m - m')``::

    l <- alpha * l + rowsum(exp(S - m')),    acc <- alpha * acc + dropout(exp(S - m')) @ V

and at the end ``out = acc / l`` and ``lse = (m, log l)`` (``(+inf, 0)`` for an empty row, whose
``out`` is 0). Masked keys (``attention_mask``, sequence bounds) are loaded as zero K and V rows:
whatever they hold has no influence.

With a local window (query i sees keys ``i - left <= j <= i + right``) the key loop starts at the
first key tile some row of the program can see and stops after the last one, so the cost grows
with seqlen x window, not seqlen^2; the scores of the tiles it walks are masked per element.
Layouts, features and numerics: :mod:`._attention_common`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends.triton._attention_common import (FWD_NO_SPEC, LN2, LOG2E, _dot, _key_tile, _program,
                                                        _rows, _scores, _window_range, kernel_args, launch_args,
                                                        strides)
from fastbert.backends.triton._philox import philox_keep_tile, philox_seed


@triton.jit(do_not_specialize=FWD_NO_SPEC)
def _attn_fwd_kernel(
    Q,  # [batch, seqlen_q, num_heads, head_dim] or [total_tokens, num_heads, head_dim]
    K,  # like Q with seqlen_k
    V,  # like K
    Out,  # like Q: the attention output
    Lse,  # fp32 [2, batch, num_heads, seqlen_q] or [2, num_heads, total_tokens]: row max m, log(row sum)
    Mask,  # uint8 [batch, seqlen_k] (nonzero = attend) when HAS_MASK
    Bias,  # [batch, num_heads, seqlen_q, seqlen_k] view (stride 0 on broadcast dims) when HAS_BIAS
    CuSeqlens,  # int32 [batch + 1] when VARLEN
    Seed,  # int64 [2]: the Philox key words, when HAS_DROPOUT
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lp, stride_lb, stride_lh, stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    num_heads, seqlen_q, seqlen_k, softmax_scale, dropout_thresh, dropout_scale,
    window_left, window_right,  # the local window (keys before / after the query) when HAS_WINDOW
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(1)
    b, h, b64, h64, start, len_q, len_k = _program(CuSeqlens, num_heads, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    dtype = Q.dtype.element_ty
    offs_m, tok_m, row_ok = _rows(pid_m * BLOCK_M, start, len_q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tok_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    mask_base = Mask + b64 * stride_mb
    if HAS_DROPOUT:
        k0, k1 = philox_seed(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (natural units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_start, key_lo, key_hi = _window_range(pid_m * BLOCK_M, len_q, len_k, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_WINDOW)
    for start_n in range(n_start, key_hi, BLOCK_N):
        offs_n, tok_n, key_ok, kv_ok = _key_tile(start_n, start, len_k, d_ok, mask_base, stride_mn, key_lo, key_hi,
                                                 BLOCK_N, HAS_MASK, HAS_WINDOW)
        k = tl.load(k_base + tok_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, window_left, window_right, HAS_BIAS, HAS_WINDOW, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no key so far has m = -inf: subtract 0 instead, so exp(-inf) = 0, never NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = philox_keep_tile(start_n, offs_m[:, None], h, b, k0, k1, dropout_thresh, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(v_base + tok_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc += _dot(p.to(dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # no key to attend: out = 0 (acc is 0), lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + tok_m[:, None] * stride_om + offs_d[None, :],
             out.to(dtype), mask=row_ok[:, None] & d_ok[None, :])
    # lse's two planes: m and log(l) apart (m + log l would round log l away where m is huge).
    lse_ptr = Lse + b64 * stride_lb + h64 * stride_lh + tok_m
    tl.store(lse_ptr, tl.where(empty, float("inf"), m_i), mask=row_ok)
    tl.store(lse_ptr + stride_lp, tl.where(empty, 0.0, tl.log2(l_safe) * LN2), mask=row_ok)


def fwd_launch(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p,
               seed, softmax_scale, allow_tf32, window=None):
    """``(grid, kwargs)`` of the forward kernel launch (shared by the launcher and the AOT compile)."""
    args, bh, seqlen_q, _, varlen = launch_args(q, k, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                                                dropout_p, seed, allow_tf32, window)
    kw = kernel_args("fwd", args, q, k, v, lse, varlen, softmax_scale, Out=out, **strides("o", out, varlen))
    return (bh, triton.cdiv(seqlen_q, kw["BLOCK_M"])), kw
