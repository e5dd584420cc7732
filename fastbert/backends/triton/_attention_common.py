"""Pieces shared by the Triton attention kernels (forward in ``_attention_fwd``, backward in
``_attention_bwd``, entry points in ``attention``): the program prologue, tile helpers, the
heuristic config table and the launch arguments common to every kernel.

Layouts and features (all combinable): padded ``[batch, seqlen, num_heads, head_dim]`` and varlen
``[total_tokens, num_heads, head_dim]`` + int32 ``cu_seqlens`` layouts (zero-length sequences
allowed); strided q/k/v/out read in place (contiguous last dim); a bool ``attention_mask``
``[batch, seqlen_k]`` (True = attend); an additive ``attn_bias`` 4-D view read through its strides
(stride 0 on broadcast dims); dropout on P with the shared Philox4x32-10 scheme v2 (one call per 8
key columns, counter = (key column // 8, query row, head, sequence), positions within the
sequence; key = the two seed words, loaded in the kernel so no host sync; nothing of size L x L is
stored); head_dim any multiple of 8 up to 256 in power-of-two buckets with masked lanes; fp16,
bf16, fp32 (IEEE unless ``allow_tf32``), fp32 accumulation, P cast to the input dtype before
``P @ V``.

Scores are kept in natural units; exponentials are base 2 of ``(s - m) * LOG2E`` (``exp(x) =
exp2(x log2 e)``), so a finite score near ``finfo(fp32).min`` never overflows.

Launch hygiene: batch x heads on grid axis 0, query/key blocks on axis 1; 64-bit base offsets;
sequence lengths and seqlen-dependent strides are not specialized; block sizes come from a
heuristic table per head_dim bucket and dtype (:func:`attention_config`), never autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.backends._philox import dropout_scale, dropout_threshold
from fastbert.backends.triton._common import INTERPRET

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2

# Arguments that vary with the sequence length (and strides that contain it) are not specialized,
# so a new sequence length never recompiles a kernel.
FWD_NO_SPEC = ["seqlen_q", "seqlen_k", "stride_lp", "stride_lb", "stride_lh", "stride_mb", "stride_bb",
               "stride_bh", "stride_bm", "window_left", "window_right"]
BWD_NO_SPEC = FWD_NO_SPEC + ["stride_db", "stride_dh", "stride_dm"]


@triton.jit
def _program(CuSeqlens, num_heads, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """The prologue of every attention kernel: grid axis 0 is ``batch * num_heads``.

    Returns ``(b, h, b64, h64, start, len_q, len_k)``: this program's sequence and head (int32:
    the Philox counter words), the same widened to int64 (base offsets are 64-bit), and its
    sequence's first token in the packed layout and query and key lengths. The caller returns
    early when its grid-axis-1 tile starts past its length.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    if VARLEN:
        start = tl.load(CuSeqlens + b)
        end = tl.load(CuSeqlens + b + 1)
        len_q = end - start
        len_k = end - start
    else:
        start = b * 0
        len_q = seqlen_q + b * 0
        len_k = seqlen_k + b * 0
    return b, h, b.to(tl.int64), h.to(tl.int64), start, len_q, len_k


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
def _rows(t0, start, length, TILE: tl.constexpr):
    """The ``TILE`` rows of one axis (queries or keys) from position ``t0`` of the program's
    sequence: ``(offs, tok, ok)``, positions in the sequence, token indices in the layout (int64)
    and which rows are inside the sequence (``length`` long)."""
    offs = t0 + tl.arange(0, TILE)
    ok = offs < length
    return offs, (start + offs).to(tl.int64), ok


@triton.jit
def _key_tile(t0, start, len_k, d_ok, mask_base, stride_mn, key_lo, key_hi, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The ``BLOCK_N`` keys from position ``t0``: ``(offs_n, tok_n, key_ok, kv_ok)``, as
    :func:`_rows`, with ``key_ok`` [BLOCK_N]: the key is inside the sequence, not masked by
    attention_mask and (with a window) inside ``[key_lo, key_hi)``, the keys some query row of the
    program can see; ``kv_ok`` [BLOCK_N, BLOCK_D] the same on the head_dim lanes ``d_ok``. K and V
    rows are loaded under it (zeros elsewhere), so such a key has no influence on anything,
    whatever its K and V rows hold (NaN, Inf): masking by replacement, free at load time."""
    offs_n = t0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < len_k
    if HAS_WINDOW:
        key_ok = key_ok & (offs_n >= key_lo) & (offs_n < key_hi)
    if HAS_MASK:
        keym = tl.load(mask_base + offs_n * stride_mn, mask=key_ok, other=0)
        key_ok = key_ok & (keym != 0)
    kv_ok = key_ok[:, None] & d_ok[None, :]
    return offs_n, (start + offs_n).to(tl.int64), key_ok, kv_ok


@triton.jit
def _window_range(t0, rows, length, before, after, TILE: tl.constexpr, STEP: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    """What the rows ``t0 .. min(t0 + TILE, rows) - 1`` of one axis see of the other axis
    (``length`` long) through the window: ``(loop start, lo, hi)``, ``[lo, hi)`` the union of the
    rows' windows (``lo = t0 - before`` may be negative) and the loop start ``max(lo, 0)`` rounded
    down to a multiple of ``STEP`` (the other axis' tile, so loads and Philox groups stay aligned).
    Without a window, everything: ``(0, 0, length)``. Query i sees key j iff
    ``i - left <= j <= i + right``: the forward and dQ kernels pass ``(left, right)``, the dK/dV
    kernel, walking the queries that see its keys, ``(right, left)``.
    """
    if HAS_WINDOW:
        lo = t0 - before
        hi = tl.minimum(tl.minimum(t0 + TILE, rows) + after, length)
        return tl.maximum(lo, 0) // STEP * STEP, lo, hi
    else:
        return 0, 0, length


@triton.jit
def _scores(q, k, key_ok, offs_m, offs_n, len_q, len_k, bias_base, stride_bm, stride_bn,
            softmax_scale, window_left, window_right, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores ``softmax_scale * q k^T + attn_bias`` of one [BLOCK_M, BLOCK_N] tile in fp32 natural
    units, ``-inf`` (by replacement) where the key is excluded, biased ``-inf`` or outside the
    query's window (``i - window_left <= j <= i + window_right``, positions in the sequence).

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
    if HAS_WINDOW:
        rel = offs_n[None, :] - offs_m[:, None]
        valid = valid & (rel >= -window_left) & (rel <= window_right)
    return tl.where(valid, s, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Configuration table
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



def attention_config(kind: str, head_dim: int, dtype: torch.dtype,
                     interpret: bool = INTERPRET) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``kind`` in ``"fwd" | "dkdv" | "dq"``.

    A heuristic table per head_dim bucket (and whether head_dim fills it) and dtype instead of
    runtime autotuning, so launches are deterministic and CUDA-graph safe. One table serves sm_80
    and sm_90 (both are gated by the ahead-of-time compile).
    """
    if interpret:
        return _INTERPRET_CONFIG
    key, bucket = (kind, 32 if dtype == torch.float32 else 16), head_dim_bucket(head_dim)
    if head_dim != bucket and bucket in _MASKED_CONFIGS.get(key, {}):
        return _MASKED_CONFIGS[key][bucket]
    return _CONFIGS[key][bucket]


# ----------------------------------------------------------------------------------------------
# Launch arguments: one builder for the forward and backward launchers
# ----------------------------------------------------------------------------------------------


def launch_args(q, k, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed, allow_tf32,
                window=None):
    """``(kwargs, batch * num_heads, seqlen_q, seqlen_k, varlen)``: the launch arguments shared by
    the forward and backward kernels, by parameter name.

    ``window``: None or ``(left, right)`` ints >= 0 (validated by ``fastbert.ops``). Clamped to
    the sequence lengths, which changes nothing (a query never sees past either end) and keeps
    every bound the kernels compute within int32. The window is one constexpr flag
    (``HAS_WINDOW``) and two runtime ints, not specialized: every window size runs one compiled
    kernel, and without a window the kernels are the ones without the feature."""
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
        window_left=min(int(window[0]), seqlen_q) if window is not None else 0,
        window_right=min(int(window[1]), seqlen_k) if window is not None else 0,
        HAS_WINDOW=window is not None, HEAD_DIM=head_dim, HAS_MASK=attention_mask is not None,
        HAS_BIAS=attn_bias is not None,
        VARLEN=varlen, HAS_DROPOUT=has_dropout, BLOCK_D=head_dim_bucket(head_dim),
        PRECISION="tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )
    return args, batch * num_heads, seqlen_q, seqlen_k, varlen


def kernel_args(kind: str, shared: dict, q, k, v, lse, varlen: bool, softmax_scale, **extra) -> dict:
    """The keyword arguments of one forward / dK-dV / dQ launch (``kind`` as in
    :func:`attention_config`): ``shared`` (from :func:`launch_args`), q, k, v and lse with their
    strides, the softmax scale, the config table's tiles, warps and stages, and the kernel's own
    ``extra`` tensors and strides. One builder for every launcher and the AOT compile."""
    block_m, block_n, warps, stages = attention_config(kind, q.shape[-1], q.dtype)
    return dict(Q=q, K=k, V=v, Lse=lse, **shared, **strides("q", q, varlen), **strides("k", k, varlen, "bnh"),
                **strides("v", v, varlen, "bnh"), **lse_strides(lse, varlen), stride_lp=lse.stride(0),
                softmax_scale=float(softmax_scale), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                num_stages=stages, **extra)


def strides(prefix: str, x: torch.Tensor, varlen: bool, names=("b", "m", "h")) -> dict:
    """``{stride_<prefix><b|m|h>: ...}`` for a q/k/v/out-like tensor: (batch, token, head) strides;
    the batch stride is 0 in the varlen layout (tokens are packed)."""
    values = (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))
    return {f"stride_{prefix}{n}": s for n, s in zip(names, values)}


def lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    """(batch, head) strides of one plane of lse (``delta`` has the same); the token stride is 1."""
    plane = lse[0]
    values = (0, plane.stride(0)) if varlen else (plane.stride(0), plane.stride(1))
    return dict(stride_lb=values[0], stride_lh=values[1])
