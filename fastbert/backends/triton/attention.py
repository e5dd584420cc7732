"""Triton fused masked multi-head attention, forward and backward (the ``triton`` backend's compute module).

Forward: the tiled online softmax of FlashAttention-2 (Dao 2023, Algorithm 1). Each program owns
``BLOCK_M`` query rows of one (sequence, head), walks the key blocks once, keeps the running row
max ``m`` and sum ``l`` in fp32 (scores in natural units; base-2 exponentials of
``(s - m) * log2(e)``, so a finite score near ``finfo(fp32).min`` never overflows), and writes
``out`` and ``lse = m + log(l)`` (``+inf`` for an empty row). Masked keys (``attention_mask``,
sequence bounds) are loaded as zero K and V rows: whatever they hold has no influence.

Backward (Dao 2023, Algorithm 2, split in two passes so that nothing is accumulated atomically):
a preprocess kernel computes ``delta = rowsum(dO * O)``; a key-block kernel walks the query
blocks and accumulates dK and dV (and writes d(attn_bias) per element); a query-block kernel
walks the key blocks and accumulates dQ. Both recompute ``P = exp(S - lse)``. Every output element
is owned by exactly one program, so the backward is deterministic with or without
``deterministic=True`` (it costs recomputing S and dO V^T once more than an atomic dQ would).
Workspace: ``delta``, fp32 like ``lse`` (from ``fastbert.backends.workspace``, the ops layer's allocator).

Features (all combinable): padded ``[batch, seqlen, num_heads, head_dim]`` and varlen
``[total_tokens, num_heads, head_dim]`` + int32 ``cu_seqlens`` layouts (zero-length sequences
allowed); strided q/k/v/out read in place (contiguous last dim); a bool ``attention_mask``
``[batch, seqlen_k]`` (True = attend); an additive ``attn_bias`` 4-D view read through its strides
(stride 0 on broadcast dims); dropout on P with the shared Philox4x32-10 scheme v2 (one call per 8 key
columns, counter = (key column // 8, query row, head, sequence), positions within the sequence;
key = the two seed words, loaded in the kernel so no host sync; nothing of size L x L is stored); head_dim any multiple of 8 up to
256 in power-of-two buckets with masked lanes; fp16, bf16, fp32 (IEEE unless ``allow_tf32``),
fp32 accumulation, P cast to the input dtype before ``P @ V``.

Launch hygiene: batch x heads on grid axis 0, query/key blocks on axis 1; 64-bit base offsets;
sequence lengths and seqlen-dependent strides are not specialized; block sizes come from a
heuristic table per head_dim bucket, dtype and arch (:func:`attention_config`), never autotuned.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastbert.backends import workspace
from fastbert.backends._philox import dropout_scale, dropout_threshold
from fastbert.backends.triton._philox import philox_keep_tile, philox_seed

# Kernels are defined once per process; TRITON_INTERPRET applies to the whole process (conftest).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # scores are kept in log2 units: exp(x) = exp2(x * log2(e))

# Arguments that vary with the sequence length (and strides that contain it) are not specialized,
# so a new sequence length never recompiles a kernel.
_FWD_NO_SPEC = ["seqlen_q", "seqlen_k", "stride_lp", "stride_lb", "stride_lh", "stride_mb", "stride_bb",
                "stride_bh", "stride_bm"]
_BWD_NO_SPEC = _FWD_NO_SPEC + ["stride_db", "stride_dh", "stride_dm"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32.

    UPCAST is set only under the interpreter for bf16: Triton 3.9's interpreter returns garbage
    for ``tl.dot`` on bf16 operands, so there the operands are widened to fp32 first (exact, the
    values are still bf16 values). The compiled bf16 path is covered by the ahead-of-time compile.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_ok(offs_n, len_k, mask_base, stride_mn, HAS_MASK: tl.constexpr):
    """[BLOCK_N] bool: the key is inside the sequence and not masked by attention_mask. K and V
    rows are loaded under it (zeros elsewhere), so a masked key has no influence on anything,
    whatever its K and V rows hold (NaN, Inf): masking by replacement, free at load time."""
    ok = offs_n < len_k
    if HAS_MASK:
        keym = tl.load(mask_base + offs_n * stride_mn, mask=ok, other=0)
        ok = ok & (keym != 0)
    return ok


@triton.jit
def _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
            softmax_scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores ``softmax_scale * q k^T + attn_bias`` of one [BLOCK_M, BLOCK_N] tile in fp32 natural
    units, ``-inf`` (by replacement) where the key is excluded or biased ``-inf``.

    The bias is read in its own dtype and added in fp32 (an fp32 -1e5 bias beside fp16 q stays
    finite). Natural units, not log2: ``finfo(fp32).min * log2(e)`` would overflow to ``-inf`` and
    empty a row that the contract says averages V; the exponentials scale the (bounded)
    differences ``s - m`` instead."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * softmax_scale
    valid = key_ok[None, :]
    if HAS_BIAS:
        inside = (offs_m < len_q)[:, None] & (offs_n < len_k)[None, :]
        bias = tl.load(bias_base + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn,
                       mask=inside, other=0.0).to(tl.float32)
        s = s + bias
        valid = valid & (bias != float("-inf"))
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _recompute_p(s, m, log_l):
    """Backward's ``P = exp((s - m) - log l)`` from the forward's two lse planes; 0 where the
    score is excluded (``-inf``) or the row is empty (``m = +inf``)."""
    p = tl.exp2(((s - m[:, None]) - log_l[:, None]) * 1.4426950408889634)
    return tl.where(s == float("-inf"), 0.0, p)


@triton.jit
def _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token of sequence b in the packed layout, its query length, its key length)."""
    if VARLEN:
        start = tl.load(CuSeqlens + b)
        end = tl.load(CuSeqlens + b + 1)
        return start, end - start, end - start
    else:
        return b * 0, seqlen_q + b * 0, seqlen_k + b * 0


@triton.jit(do_not_specialize=_FWD_NO_SPEC)
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
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    dtype = Q.dtype.element_ty
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < len_q
    tok_m = (start + offs_m).to(tl.int64)  # token index of each query row in the layout
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
    for start_n in range(0, len_k, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = _key_ok(offs_n, len_k, mask_base, stride_mn, HAS_MASK)
        kv_ok = key_ok[:, None] & d_ok[None, :]
        tok_n = (start + offs_n).to(tl.int64)
        k = tl.load(k_base + tok_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, HAS_BIAS, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no key so far has m = -inf: subtract 0 instead, so exp(-inf) = 0, never NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
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
    tl.store(lse_ptr + stride_lp, tl.where(empty, 0.0, tl.log2(l_safe) * 0.6931471805599453), mask=row_ok)


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
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, len_q, _ = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_q, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok_m = (start + offs_m).to(tl.int64)
    ok = (offs_m < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + tok_m[:, None] * stride_om + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_dom + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + tok_m, tl.sum(o * do, 1), mask=offs_m < len_q)


@triton.jit(do_not_specialize=_BWD_NO_SPEC)
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
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # With Z = keep / (1 - p) (1 without dropout) and P recomputed as exp(S - lse):
    #   dV = (P * Z)^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - delta),  dK = scale * dS^T Q,
    #   d(attn_bias) = dS.
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    dtype = Q.dtype.element_ty
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask_base = Mask + b64 * stride_mb
    key_ok = _key_ok(offs_n, len_k, mask_base, stride_mn, HAS_MASK)
    kv_ok = key_ok[:, None] & d_ok[None, :]
    tok_n = (start + offs_n).to(tl.int64)
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
    for start_m in range(0, len_q, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < len_q
        tok_m = (start + offs_m).to(tl.int64)
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + tok_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_base + tok_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
        # m = +inf outside the sequence and on empty rows: P = exp(-inf) = 0 there.
        m = tl.load(Lse + l_base + tok_m, mask=row_ok, other=float("inf"))
        log_l = tl.load(Lse + stride_lp + l_base + tok_m, mask=row_ok, other=0.0)
        delta = tl.load(Delta + l_base + tok_m, mask=row_ok, other=0.0)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, HAS_BIAS, PRECISION, UPCAST)
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


@triton.jit(do_not_specialize=_FWD_NO_SPEC)
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta,  # as in the dK/dV kernel
    DQ,  # like Q: output
    Mask, Bias, CuSeqlens, Seed,  # as in the forward kernel
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lp, stride_lb, stride_lh,
    stride_mb, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    num_heads, seqlen_q, seqlen_k, softmax_scale, dropout_thresh, dropout_scale,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dQ = scale * dS K with dS = P * ((dO V^T) * Z - delta), as in the dK/dV kernel.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    dtype = Q.dtype.element_ty
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < len_q
    q_ok = row_ok[:, None] & d_ok[None, :]
    tok_m = (start + offs_m).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tok_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_ok, other=0.0)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_dom + offs_d[None, :],
                 mask=q_ok, other=0.0)
    l_base = b64 * stride_lb + h64 * stride_lh
    m = tl.load(Lse + l_base + tok_m, mask=row_ok, other=float("inf"))
    log_l = tl.load(Lse + stride_lp + l_base + tok_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + l_base + tok_m, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    mask_base = Mask + b64 * stride_mb
    if HAS_DROPOUT:
        k0, k1 = philox_seed(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = _key_ok(offs_n, len_k, mask_base, stride_mn, HAS_MASK)
        kv_ok = key_ok[:, None] & d_ok[None, :]
        tok_n = (start + offs_n).to(tl.int64)
        k = tl.load(k_base + tok_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + tok_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
                    softmax_scale, HAS_BIAS, PRECISION, UPCAST)
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


# ----------------------------------------------------------------------------------------------
# Configuration table and launchers
# ----------------------------------------------------------------------------------------------

# Smallest tile tl.dot takes is 16 in every dimension.
_MIN_BLOCK = 16


def head_dim_bucket(head_dim: int) -> int:
    """The power-of-two tile width (>= 16) that holds ``head_dim``; padded lanes are masked."""
    return max(_MIN_BLOCK, triton.next_power_of_2(head_dim))


# kind -> dtype size class ("16" = fp16/bf16, "32" = fp32) -> head_dim bucket ->
# (BLOCK_M, BLOCK_N, num_warps, num_stages). kind: "fwd" (BLOCK_M query rows per program), "dkdv"
# (BLOCK_N keys per program, BLOCK_M query rows per inner step), "dq" (BLOCK_M query rows per
# program). Chosen by ahead-of-time compiles of the highest-pressure variant (mask + bias + dbias +
# dropout, padded and varlen) for sm_80 and sm_90 so that fp16/bf16 up to head_dim 128 compile
# without spills (tests/test_triton_aot_attention.py is the gate). The forward tile is at ptxas's
# 255-register limit in most configs (Philox on the whole score tile, the bias tile and its
# addresses); a head_dim that does not fill its bucket (masked lanes, e.g. 40, 80, 200) needs more
# registers still and takes the narrower tiles of _MASKED_CONFIGS. IEEE fp32 has no tensor-core
# tl.dot (FMA instead), so fp32 tiles are small; its spills are a recorded budget, not gated.
_CONFIGS = {
    ("fwd", 16): {16: (128, 32, 8, 3), 32: (128, 32, 8, 3), 64: (128, 32, 8, 3), 128: (128, 16, 8, 2),
                  256: (64, 16, 8, 2)},
    ("fwd", 32): {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 8, 2), 128: (64, 16, 8, 2),
                  256: (32, 16, 8, 1)},
    ("dkdv", 16): {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 64, 8, 2),
                   256: (16, 32, 8, 1)},
    ("dkdv", 32): {16: (32, 16, 4, 1), 32: (32, 16, 4, 1), 64: (32, 16, 4, 1), 128: (16, 16, 4, 1),
                   256: (16, 16, 8, 1)},
    ("dq", 16): {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 8, 2), 128: (64, 32, 8, 2),
                 256: (32, 16, 8, 1)},
    ("dq", 32): {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (32, 16, 8, 1),
                 256: (16, 16, 8, 1)},
}
_MASKED_CONFIGS = {
    ("fwd", 16): {16: (128, 16, 8, 2), 32: (128, 16, 8, 2), 64: (128, 16, 8, 2), 128: (128, 16, 8, 2),
                  256: (32, 16, 8, 2)},
}
# Under the interpreter every program runs in sequence on the CPU: small square tiles keep the
# masked work on short test sequences low.
_INTERPRET_CONFIG = (32, 32, 1, 1)


def attention_config(kind: str, head_dim: int, dtype: torch.dtype, arch: int | None = None,
                     interpret: bool = INTERPRET) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``kind`` in ``"fwd" | "dkdv" | "dq"``.

    A heuristic table per head_dim bucket (and whether head_dim fills it), dtype and arch
    (``arch``: compute capability major, 8 or 9; one table serves sm_80 and sm_90 today) instead
    of runtime autotuning, so launches are deterministic and CUDA-graph safe.
    """
    if interpret:
        return _INTERPRET_CONFIG
    key, bucket = (kind, 32 if dtype == torch.float32 else 16), head_dim_bucket(head_dim)
    if head_dim != bucket and bucket in _MASKED_CONFIGS.get(key, {}):
        return _MASKED_CONFIGS[key][bucket]
    return _CONFIGS[key][bucket]


def _device_arch(q: torch.Tensor) -> int | None:
    """Compute capability major of q's GPU (None under the interpreter / off CUDA)."""
    if INTERPRET or q.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(q.device)[0]


def _common(q, k, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed, allow_tf32, arch):
    """Launch arguments shared by the forward and backward kernels, by parameter name."""
    varlen = cu_seqlens is not None
    if varlen:
        batch = cu_seqlens.shape[0] - 1
        num_heads, head_dim = q.shape[1], q.shape[2]
        seqlen_q = seqlen_k = int(max_seqlen)
    else:
        batch, seqlen_q, num_heads, head_dim = q.shape
        seqlen_k = k.shape[1]
    dummy = q  # never read: the matching constexpr flag is off
    has_dropout = dropout_p > 0.0
    mask_strides = attention_mask.stride() if attention_mask is not None else (0, 0)
    bias_strides = attn_bias.stride() if attn_bias is not None else (0, 0, 0, 0)
    args = dict(
        Mask=attention_mask.view(torch.uint8) if attention_mask is not None else dummy,
        Bias=attn_bias if attn_bias is not None else dummy,
        CuSeqlens=cu_seqlens if varlen else dummy, Seed=seed if has_dropout else dummy,
        stride_mb=mask_strides[0], stride_mn=mask_strides[1],
        stride_bb=bias_strides[0], stride_bh=bias_strides[1], stride_bm=bias_strides[2],
        stride_bn=bias_strides[3],
        num_heads=num_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        dropout_thresh=dropout_threshold(dropout_p) if has_dropout else 0,
        dropout_scale=dropout_scale(dropout_p) if has_dropout else 1.0,
        HEAD_DIM=head_dim, HAS_MASK=attention_mask is not None, HAS_BIAS=attn_bias is not None,
        VARLEN=varlen, HAS_DROPOUT=has_dropout, BLOCK_D=head_dim_bucket(head_dim),
        PRECISION="tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )
    return args, batch * num_heads, seqlen_q, seqlen_k, varlen


def _strides(prefix: str, x: torch.Tensor, varlen: bool, names=("b", "m", "h")) -> dict:
    """``{stride_<prefix><b|m|h>: ...}`` for a q/k/v/out-like tensor: (batch, token, head) strides;
    the batch stride is 0 in the varlen layout (tokens are packed)."""
    values = (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))
    return {f"stride_{prefix}{n}": s for n, s in zip(names, values)}


def _lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    """(batch, head) strides of one plane of lse (``delta`` has the same); the token stride is 1."""
    plane = lse[0]
    values = (0, plane.stride(0)) if varlen else (plane.stride(0), plane.stride(1))
    return dict(stride_lb=values[0], stride_lh=values[1])


def fwd_launch(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p,
               seed, softmax_scale, allow_tf32, arch):
    """``(grid, kwargs)`` of the forward kernel launch (shared by the launcher and the AOT compile)."""
    args, bh, seqlen_q, _, varlen = _common(q, k, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                                            dropout_p, seed, allow_tf32, arch)
    block_m, block_n, warps, stages = attention_config("fwd", q.shape[-1], q.dtype, arch)
    kw = dict(Q=q, K=k, V=v, Out=out, Lse=lse, **args, **_strides("q", q, varlen),
              **_strides("k", k, varlen, "bnh"), **_strides("v", v, varlen, "bnh"),
              **_strides("o", out, varlen), **_lse_strides(lse, varlen), stride_lp=lse.stride(0),
              softmax_scale=float(softmax_scale), BLOCK_M=block_m, BLOCK_N=block_n,
              num_warps=warps, num_stages=stages)
    return (bh, triton.cdiv(seqlen_q, block_m)), kw


def bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias, delta, *, attention_mask, attn_bias,
                 cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32, arch):
    """``[(kernel, grid, kwargs)]`` of the three backward launches, in order (preprocess, dK/dV,
    dQ); shared by the launcher and the AOT compile. ``delta``: fp32 workspace like one plane of ``lse``."""
    args, bh, seqlen_q, seqlen_k, varlen = _common(q, k, attention_mask, attn_bias, cu_seqlens,
                                                   max_seqlen, dropout_p, seed, allow_tf32, arch)
    head_dim = q.shape[-1]
    tensors = dict(Q=q, K=k, V=v, DOut=dout, Lse=lse, Delta=delta, **_strides("q", q, varlen),
                   **_strides("k", k, varlen, "bnh"), **_strides("v", v, varlen, "bnh"),
                   **_strides("do", dout, varlen), **_lse_strides(lse, varlen), stride_lp=lse.stride(0))
    launches = []

    block_m, _, warps, _ = attention_config("dq", head_dim, q.dtype, arch)
    pre = dict(Out=out, DOut=dout, Delta=delta, CuSeqlens=args["CuSeqlens"], **_strides("o", out, varlen),
               **_strides("do", dout, varlen), **_lse_strides(lse, varlen), num_heads=args["num_heads"],
               seqlen_q=seqlen_q, HEAD_DIM=head_dim, VARLEN=varlen, BLOCK_M=block_m,
               BLOCK_D=args["BLOCK_D"], num_warps=warps, num_stages=1)
    launches.append((_attn_bwd_preprocess_kernel, (bh, triton.cdiv(seqlen_q, block_m)), pre))

    block_m, block_n, warps, stages = attention_config("dkdv", head_dim, q.dtype, arch)
    store_dbias = dbias is not None
    db_strides = dbias.stride()[:3] if store_dbias else (0, 0, 0)
    dkdv = dict(**tensors, **args, DK=dk, DV=dv, DBias=dbias if store_dbias else delta,
                **_strides("dk", dk, varlen, "bnh"), **_strides("dv", dv, varlen, "bnh"),
                stride_db=db_strides[0], stride_dh=db_strides[1], stride_dm=db_strides[2],
                softmax_scale=float(softmax_scale), STORE_DBIAS=store_dbias, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    launches.append((_attn_bwd_dkdv_kernel, (bh, triton.cdiv(seqlen_k, block_n)), dkdv))

    block_m, block_n, warps, stages = attention_config("dq", head_dim, q.dtype, arch)
    dqk = dict(**tensors, **args, DQ=dq, **_strides("dq", dq, varlen), softmax_scale=float(softmax_scale),
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    launches.append((_attn_bwd_dq_kernel, (bh, triton.cdiv(seqlen_q, block_m)), dqk))
    return launches


def _device_ctx(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False):
    """Backend entry point (contract in :mod:`fastbert.backends`): writes ``out`` and ``lse``."""
    grid, kw = fwd_launch(q, k, v, out, lse, attention_mask=attention_mask, attn_bias=attn_bias,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                          softmax_scale=softmax_scale, allow_tf32=allow_tf32, arch=_device_arch(q))
    if grid[0] * grid[1] == 0:
        return
    with _device_ctx(q):
        _attn_fwd_kernel[grid](**kw)


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False):
    """Backend entry point: writes dq, dk, dv and, when ``dbias`` is given, the full fp32
    ``[batch, num_heads, seqlen_q, seqlen_k]`` scores-bias gradient.

    Deterministic always (every output element has one owner, no atomics), so
    ``deterministic=True`` needs nothing extra. Workspace: ``delta``, fp32 like one plane of ``lse``.
    """
    delta = workspace(lse.shape[1:], torch.float32, lse.device)  # like one plane of lse
    launches = bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias, delta,
                            attention_mask=attention_mask, attn_bias=attn_bias, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                            softmax_scale=softmax_scale, allow_tf32=allow_tf32, arch=_device_arch(q))
    with _device_ctx(q):
        for kernel, grid, kw in launches:
            if grid[0] * grid[1] == 0:
                return
            kernel[grid](**kw)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (fastbert.backends.triton._aot; gate: tests/test_triton_aot_attention.py)
# ----------------------------------------------------------------------------------------------

# CI compiles the highest-pressure variant of every head_dim bucket in fp16 and bf16 (the
# zero-spill gate; bf16 also covers the compiled bf16 tl.dot, which the interpreter cannot run);
# the full matrix (``full=True``, ``-m slow``) adds fp32 (slow to compile: IEEE fp32 tl.dot lowers
# to FMAs), the non-power-of-two head_dims, the varlen layout and TF32.
AOT_CI = tuple((dt, hd) for dt in (torch.float16, torch.bfloat16) for hd in (16, 32, 64, 128, 256))
AOT_FULL_HEAD_DIMS = (8, 16, 24, 32, 40, 64, 80, 96, 128, 200, 256)
# Spill budgets (bytes of spill stores + loads, per launch name, dtype and head_dim bucket) where
# zero is not reached: 1.5x the largest value ptxas reported (Triton 3.9, sm_80 and sm_90, every
# head_dim and layout of the bucket), rounded up to 64. Zero everywhere else; fp16/bf16 up to
# head_dim 128 must stay at zero (the gate). fp32 is IEEE FMA tl.dot: big per-thread tiles.
AOT_SPILL_BUDGETS: dict[tuple[str, str, int], int] = {
    ("bwd_dkdv", "float32", 64): 128,  # observed 80
    ("bwd_dkdv", "float32", 128): 1792,  # observed 1180
    ("bwd_dkdv", "float32", 256): 1728,  # observed 1120
    ("bwd_dq", "bfloat16", 256): 64,  # observed 8
    ("bwd_dq", "float16", 256): 64,  # observed 8
    ("bwd_dq", "float32", 256): 64,  # observed 40
    ("fwd", "float32", 32): 256,  # observed 160
    ("fwd", "float32", 64): 64,  # observed 32
    ("fwd", "float32", 128): 1664,  # observed 1092
    ("fwd", "float32", 256): 64,  # observed 32
}


def _aot_spill_budget(kind: str, dtype: torch.dtype, head_dim: int) -> int:
    return AOT_SPILL_BUDGETS.get((kind, str(dtype).replace("torch.", ""), head_dim_bucket(head_dim)), 0)


def aot_launches(dtype: torch.dtype, head_dim: int, *, varlen: bool = False, arch: int = 90,
                 allow_tf32: bool = False, dropout: bool = True, batch: int = 4, seqlen: int = 512,
                 num_heads: int = 12):
    """``[(label, kernel, kwargs)]`` of every attention launch for one configuration, built by the
    launchers' own argument builders from meta tensors (data_ptr 0: 16-byte aligned, like torch's
    allocations). Padded: every feature on (mask, bias with gradient, dropout); varlen: dropout."""
    meta = dict(device="meta")
    tokens = (batch * seqlen,) if varlen else (batch, seqlen)
    qkv = torch.empty(*tokens, 3, num_heads, head_dim, dtype=dtype, **meta)  # q, k, v read in place
    q, k, v = qkv.unbind(-3)
    out, dout = torch.empty_like(q), torch.empty_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if varlen:
        lse = torch.empty(2, num_heads, batch * seqlen, dtype=torch.float32, **meta)
        kw = dict(attention_mask=None, attn_bias=None, max_seqlen=seqlen,
                  cu_seqlens=torch.empty(batch + 1, dtype=torch.int32, **meta))
        dbias = None
    else:
        lse = torch.empty(2, batch, num_heads, seqlen, dtype=torch.float32, **meta)
        bias = torch.empty(batch, num_heads, seqlen, seqlen, dtype=dtype, **meta)
        kw = dict(attention_mask=torch.empty(batch, seqlen, dtype=torch.bool, **meta), attn_bias=bias,
                  cu_seqlens=None, max_seqlen=None)
        dbias = torch.empty(bias.shape, dtype=torch.float32, **meta)
    kw.update(dropout_p=0.1 if dropout else 0.0, seed=torch.empty(2, dtype=torch.int64, **meta), softmax_scale=head_dim ** -0.5,
              allow_tf32=allow_tf32, arch=arch)
    _, fkw = fwd_launch(q, k, v, out, lse, **kw)
    launches = [("fwd", _attn_fwd_kernel, fkw)]
    names = ("bwd_preprocess", "bwd_dkdv", "bwd_dq")
    for name, (kernel, _, bkw) in zip(names, bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias,
                                                          torch.empty_like(lse[0]), **kw)):
        launches.append((name, kernel, bkw))
    return launches


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants: the highest-pressure variant of each kernel (padded layout,
    every feature on) for :data:`AOT_CI`; ``full`` compiles every head_dim bucket and dtype, the
    non-power-of-two head_dims, the varlen layout and the preprocess kernel. One config table
    serves sm_80 and sm_90 today, so each variant is compiled for both."""
    from fastbert.backends.triton._aot import AotVariant, split_launch

    if full:
        configs = [(dt, hd, varlen, False) for dt in (torch.float16, torch.bfloat16, torch.float32)
                   for hd in AOT_FULL_HEAD_DIMS for varlen in (False, True)]
        configs += [(torch.float32, hd, False, True) for hd in (64, 128)]  # the TF32 tl.dot
    else:
        configs = [(dt, hd, False, False) for dt, hd in AOT_CI]
    out = []
    for dtype, head_dim, varlen, tf32 in configs:
        for kind, kernel, kw in aot_launches(dtype, head_dim, varlen=varlen, allow_tf32=tf32):
            if kind == "bwd_preprocess" and not full:
                continue  # a row reduction: no register pressure to gate
            label = (f"attention_{kind} {str(dtype)[6:]} d={head_dim}{' varlen' if varlen else ''}"
                     f"{' tf32' if tf32 else ''}")
            out.append(AotVariant(label, kernel, *split_launch(kernel, kw),
                                  spill_budget=_aot_spill_budget(kind, dtype, head_dim)))
    return out
