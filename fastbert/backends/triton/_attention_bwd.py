"""Triton attention backward kernels and their launch arguments.

FlashAttention-2's backward (Dao 2023, Algorithm 2), split in two passes so that nothing is
accumulated atomically: a preprocess kernel computes ``delta = rowsum(dO * O)``; a key-block
kernel walks the query blocks and accumulates dK and dV (and writes d(attn_bias) per element); a
query-block kernel walks the key blocks and accumulates dQ. Both recompute ``P = exp(S - lse)``
from the forward's two lse planes. With ``Z = keep / (1 - p)`` (1 without dropout)::

    dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - delta),
    dK = scale * dS^T Q,   dQ = scale * dS K,   d(attn_bias) = dS

Every output element is owned by exactly one program, so the backward is deterministic with or
without ``deterministic=True`` (it costs recomputing S and dO V^T once more than an atomic dQ
would). Workspace: ``delta``, fp32 like one plane of ``lse`` (allocated by the entry point).

With a local window the dQ kernel walks only the key tiles its rows can see and the dK/dV kernel
only the query tiles that can see its keys (query i sees key j iff ``i - left <= j <= i + right``,
so key j is seen by queries ``j - right <= i <= j + left``); the tiles walked are masked per element.
d(attn_bias) outside the walked tiles is zero: the entry point zero-fills it first.
Layouts, features and numerics: :mod:`._attention_common`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends.triton._attention_common import (BWD_NO_SPEC, FWD_NO_SPEC, LOG2E, _dot, _key_tile,
                                                        _program, _rows, _scores, _window_range, attention_config,
                                                        kernel_args, launch_args, lse_strides, strides)
from fastbert.backends.triton._philox import philox_keep_tile, philox_seed


@triton.jit
def _row_stats(Lse, Delta, l_base, stride_lp, tok_m, row_ok):
    """(m, log l, delta) of the query rows ``tok_m``: the forward's two lse planes and the
    preprocess's rowsum(dO * O). ``m = +inf`` outside the sequence (and on empty rows), so that
    :func:`_recompute_p` gives P = 0 there."""
    m = tl.load(Lse + l_base + tok_m, mask=row_ok, other=float("inf"))
    log_l = tl.load(Lse + stride_lp + l_base + tok_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + l_base + tok_m, mask=row_ok, other=0.0)
    return m, log_l, delta


@triton.jit
def _recompute_p(s, m, log_l):
    """Backward's ``P = exp((s - m) - log l)`` from the forward's two lse planes; 0 where the
    score is excluded (``-inf``) or the row is empty (``m = +inf``)."""
    p = tl.exp2(((s - m[:, None]) - log_l[:, None]) * LOG2E)
    return tl.where(s == float("-inf"), 0.0, p)


@triton.jit(do_not_specialize=["seqlen_q", "stride_lb", "stride_lh"])
def _attn_bwd_preprocess_kernel(
    Out,  # like Q: forward output
    DOut,  # like Q: gradient of the output
    Delta,  # fp32, like Lse: rowsum(dO * O)
    CuSeqlens,  # int32 [batch + 1] when VARLEN
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    num_heads, seqlen_q,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(1)
    _, _, b64, h64, start, len_q, _ = _program(CuSeqlens, num_heads, seqlen_q, seqlen_q, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m, tok_m, row_ok = _rows(pid_m * BLOCK_M, start, len_q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + tok_m[:, None] * stride_om + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_dom + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + tok_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit(do_not_specialize=BWD_NO_SPEC)
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # forward inputs (layouts as in the forward kernel)
    DOut,  # like Q: gradient of the output
    Lse,  # fp32 like the forward's Lse
    Delta,  # fp32 like Lse: rowsum(dO * O)
    DK, DV,  # like K, V: outputs
    DBias,  # fp32 [batch, num_heads, seqlen_q, seqlen_k]: output when STORE_DBIAS
    Mask, Bias, CuSeqlens, Seed,  # as in the forward kernel
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh, stride_lp, stride_lb, stride_lh, stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_db, stride_dh, stride_dm,
    num_heads, seqlen_q, seqlen_k, softmax_scale, dropout_thresh, dropout_scale,
    window_left, window_right,  # as in the forward kernel
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr, STORE_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dV = (P * Z)^T dO, dK = scale * dS^T Q, d(attn_bias) = dS over the query blocks (module doc).
    pid_n = tl.program_id(1)
    b, h, b64, h64, start, len_q, len_k = _program(CuSeqlens, num_heads, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    dtype = Q.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask_base = Mask + b64 * stride_mb
    # With a window, a key past the last query's window (j > len_q - 1 + right) is seen by no one.
    offs_n, tok_n, key_ok, kv_ok = _key_tile(pid_n * BLOCK_N, start, len_k, d_ok, mask_base, stride_mn, 0,
                                             len_q + window_right, BLOCK_N, HAS_MASK, HAS_WINDOW)
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + tok_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + tok_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_ok, other=0.0)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DOut + b64 * stride_dob + h64 * stride_doh
    l_base = b64 * stride_lb + h64 * stride_lh
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    db_base = DBias + b64 * stride_db + h64 * stride_dh
    if HAS_DROPOUT:
        k0, k1 = philox_seed(Seed)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_start, _, q_hi = _window_range(pid_n * BLOCK_N, len_k, len_q, window_right, window_left,
                                     BLOCK_N, BLOCK_M, HAS_WINDOW)
    for start_m in range(m_start, q_hi, BLOCK_M):
        offs_m, tok_m, row_ok = _rows(start_m, start, len_q, BLOCK_M)
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + tok_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_base + tok_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
        m, log_l, delta = _row_stats(Lse, Delta, l_base, stride_lp, tok_m, row_ok)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, window_left, window_right, HAS_BIAS, HAS_WINDOW, PRECISION, UPCAST)
        p = _recompute_p(s, m, log_l)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = philox_keep_tile(pid_n * BLOCK_N, offs_m[:, None], h, b, k0, k1, dropout_thresh, BLOCK_M,
                                    BLOCK_N)
            pz = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            pz = p
        dv += _dot(tl.trans(pz.to(dtype)), do, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if STORE_DBIAS:
            tl.store(db_base + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :], ds,
                     mask=row_ok[:, None] & (offs_n < len_k)[None, :])
        dk += _dot(tl.trans(ds.to(dtype)), q, PRECISION, UPCAST)
    dk = dk * softmax_scale
    in_seq = (offs_n < len_k)[:, None] & d_ok[None, :]  # masked keys too: their dK, dV are zeros
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + tok_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(dtype), mask=in_seq)
    tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + tok_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(dtype), mask=in_seq)


@triton.jit(do_not_specialize=FWD_NO_SPEC)
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta,  # as in the dK/dV kernel
    DQ,  # like Q: output
    Mask, Bias, CuSeqlens, Seed,  # as in the forward kernel
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lp, stride_lb, stride_lh,
    stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    num_heads, seqlen_q, seqlen_k, softmax_scale, dropout_thresh, dropout_scale,
    window_left, window_right,  # as in the forward kernel
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dQ = scale * dS K over the key blocks, dS as in the dK/dV kernel (module doc).
    pid_m = tl.program_id(1)
    b, h, b64, h64, start, len_q, len_k = _program(CuSeqlens, num_heads, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    dtype = Q.dtype.element_ty
    offs_m, tok_m, row_ok = _rows(pid_m * BLOCK_M, start, len_q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tok_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_ok, other=0.0)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_dom + offs_d[None, :],
                 mask=q_ok, other=0.0)
    m, log_l, delta = _row_stats(Lse, Delta, b64 * stride_lb + h64 * stride_lh, stride_lp, tok_m, row_ok)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    mask_base = Mask + b64 * stride_mb
    if HAS_DROPOUT:
        k0, k1 = philox_seed(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_start, key_lo, key_hi = _window_range(pid_m * BLOCK_M, len_q, len_k, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_WINDOW)
    for start_n in range(n_start, key_hi, BLOCK_N):
        offs_n, tok_n, key_ok, kv_ok = _key_tile(start_n, start, len_k, d_ok, mask_base, stride_mn, key_lo, key_hi,
                                                 BLOCK_N, HAS_MASK, HAS_WINDOW)
        k = tl.load(k_base + tok_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + tok_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, window_left, window_right, HAS_BIAS, HAS_WINDOW, PRECISION, UPCAST)
        p = _recompute_p(s, m, log_l)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = philox_keep_tile(start_n, offs_m[:, None], h, b, k0, k1, dropout_thresh, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(dtype), k, PRECISION, UPCAST)
    dq = dq * softmax_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tok_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dtype), mask=q_ok)


def bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias, delta, *, attention_mask, attn_bias,
                 cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32, window=None):
    """``[(kernel, grid, kwargs)]`` of the three backward launches, in order (preprocess, dK/dV,
    dQ); shared by the launcher and the AOT compile. ``delta``: fp32 workspace like one plane of ``lse``."""
    args, bh, seqlen_q, seqlen_k, varlen = launch_args(q, k, attention_mask, attn_bias, cu_seqlens,
                                                       max_seqlen, dropout_p, seed, allow_tf32, window)
    head_dim = q.shape[-1]
    launches = []

    block_m, _, warps, _ = attention_config("dq", head_dim, q.dtype)
    pre = dict(Out=out, DOut=dout, Delta=delta, CuSeqlens=args["CuSeqlens"], **strides("o", out, varlen),
               **strides("do", dout, varlen), **lse_strides(lse, varlen), num_heads=args["num_heads"],
               seqlen_q=seqlen_q, HEAD_DIM=head_dim, VARLEN=varlen, BLOCK_M=block_m,
               BLOCK_D=args["BLOCK_D"], num_warps=warps, num_stages=1)
    launches.append((_attn_bwd_preprocess_kernel, (bh, triton.cdiv(seqlen_q, block_m)), pre))

    grads = dict(DOut=dout, Delta=delta, **strides("do", dout, varlen))  # what both gradient kernels read
    store_dbias = dbias is not None
    db_strides = dbias.stride()[:3] if store_dbias else (0, 0, 0)
    dkdv = kernel_args("dkdv", args, q, k, v, lse, varlen, softmax_scale, **grads, DK=dk, DV=dv,
                       DBias=dbias if store_dbias else delta, **strides("dk", dk, varlen, "bnh"),
                       **strides("dv", dv, varlen, "bnh"), stride_db=db_strides[0], stride_dh=db_strides[1],
                       stride_dm=db_strides[2], STORE_DBIAS=store_dbias)
    launches.append((_attn_bwd_dkdv_kernel, (bh, triton.cdiv(seqlen_k, dkdv["BLOCK_N"])), dkdv))

    dqk = kernel_args("dq", args, q, k, v, lse, varlen, softmax_scale, **grads, DQ=dq, **strides("dq", dq, varlen))
    launches.append((_attn_bwd_dq_kernel, (bh, triton.cdiv(seqlen_q, dqk["BLOCK_M"])), dqk))
    return launches
