"""Triton LayerNorm with BERT's add & norm fusion, forward and backward (the ``triton`` backend's
compute module for ``layer_norm``).

Forward, per row of ``[rows, hidden]`` (Ba et al. 2016, eqs. 3-4)::

    h    = dropout(x + x_bias) + residual        # stored in x's dtype when anything is fused
    mean = sum(h) / n,  var = sum((h - mean)^2) / n,  rstd = 1 / sqrt(var + eps)   (fp32)
    y    = (h - mean) * rstd * weight + bias

The statistics are taken over the stored (rounded) h, which is what backward reads, so forward
and backward agree. The variance is two-pass over the row held in registers, never
E[h^2] - E[h]^2; a row wider than one block is walked in chunks, each chunk's (count, mean, M2)
two-pass and merged by Chan et al.'s pairwise update (Chan, Golub & LeVeque 1983), then h is
recomputed chunk by chunk to normalise. Masked lanes contribute nothing: they are zeroed before
every sum and the divisor is the true hidden size. An all-zero row gives var = 0 and h - mean = 0,
so y = bias for any eps > 0 (no NaN).

Backward, with xhat = (h - mean) * rstd and g = dy * weight::

    dh         = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dresidual  = dh,   dx = dh * keep * dropout_scale(p),   dx_bias = sum_rows(dx)
    dweight    = sum_rows(dy * xhat),   dbias = sum_rows(dy)

The row sums are deterministic: each of ``P`` programs walks a fixed set of row tiles and keeps
fp32 partial sums, written to a ``[3, P, hidden]`` fp32 workspace (torch's allocator); the final
sum over ``P`` is ``torch.sum`` in a fixed order. No atomics.

Dropout draws the shared Philox4x32-10 mask, v2 (``fastbert.backends._philox.rows_keep_mask``):
one call per 8 columns, counter = (column // 8, row & 0xFFFFFFFF, row >> 32, 0), key = the two
seed words (loaded in the kernel, no host sync), keep iff the column's 16-bit half >=
``dropout_threshold(p)``, scale ``dropout_scale(p)``; backward regenerates it.

Offsets are 64-bit (row index widened before it multiplies the row stride), so tensors past 2**31
elements are addressed correctly. Block sizes and warps come from :func:`fwd_config` /
:func:`bwd_config` (a heuristic in the hidden size; no runtime autotuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastbert.backends import workspace
from fastbert.backends._philox import dropout_scale, dropout_threshold
from fastbert.backends.triton._common import TILE_SCALE, cast_rne, device_ctx
from fastbert.backends.triton._philox import philox_keep_cols, philox_keep_tile, philox_seed

# A row up to this many elements (rounded up to a power of two) is held in registers in one block;
# wider rows are walked in chunks of CHUNK_N.
MAX_BLOCK_N = 8192
CHUNK_N = 4096


@dataclass(frozen=True)
class Config:
    """Launch configuration: a ``BLOCK_M x BLOCK_N`` tile, ``NUM_CHUNKS`` column chunks per row."""

    block_m: int
    block_n: int
    num_chunks: int
    num_warps: int


def _config(hidden: int, tile_elems: int, per_thread: int, block_n: int | None) -> Config:
    if block_n is None:
        block_n = triton.next_power_of_2(hidden)
        if block_n > MAX_BLOCK_N:
            block_n = CHUNK_N
    num_chunks = triton.cdiv(hidden, block_n)
    block_m = max(1, min(16, tile_elems // block_n)) if num_chunks == 1 else 1
    # per_thread elements of the tile per thread; the chunked path keeps more values alive.
    per_thread = per_thread if num_chunks == 1 else per_thread // 2
    num_warps = max(4, min(16, block_m * block_n // (32 * per_thread)))
    return Config(block_m * TILE_SCALE if num_chunks == 1 else 1, block_n, num_chunks, num_warps)


def fwd_config(hidden: int, block_n: int | None = None) -> Config:
    """Forward tile: rows of up to 8192 in registers, ``BLOCK_M`` rows per program for narrow rows
    (~4096-element tiles), 16 elements per thread (8 when chunked)."""
    return _config(hidden, 4096, 16, block_n)


def bwd_config(hidden: int, block_n: int | None = None) -> Config:
    """Backward tile: more live values per element (dy, h, xhat, g, dh, three row sums), so half
    the forward's rows and 8 elements per thread (4 when chunked)."""
    return _config(hidden, 2048, 8, block_n)


@triton.jit
def _tile_rows(tile, BLOCK_M: tl.constexpr):
    """Row indices of row tile ``tile`` as int64, so ``row * hidden`` cannot overflow int32 (the row
    index itself fits in int32: fewer than 2**31 rows)."""
    return (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)


@triton.jit
def _offsets(row_idx, cols, hidden):
    """Element offsets ``row * hidden + col`` of a tile, int64 (row_idx is int64)."""
    return row_idx[:, None] * hidden + cols[None, :]


@triton.jit
def _keep(col0, rows, k0, k1, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask ``[BLOCK_M, BLOCK_N]`` of the tile of columns ``col0 + arange(BLOCK_N)``
    (col0 a multiple of BLOCK_N) and int64 ``rows``: one Philox call per 8 columns (per element on
    tiles narrower than 8)."""
    if BLOCK_N >= 8:
        return philox_keep_tile(col0, (rows & 0xFFFFFFFF)[:, None], (rows >> 32)[:, None], 0, k0, k1,
                                threshold, BLOCK_M, BLOCK_N)
    else:
        c2 = tl.broadcast_to((col0 + tl.arange(0, BLOCK_N))[None, :], [BLOCK_M, BLOCK_N])
        r2 = tl.broadcast_to(rows[:, None], [BLOCK_M, BLOCK_N])
        return philox_keep_cols(c2, r2 & 0xFFFFFFFF, r2 >> 32, 0, k0, k1, threshold)


@triton.jit
def _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, rows, cols, col0, mask, col_mask, k0, k1, threshold, scale,
              HAS_XBIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              STORE_H: tl.constexpr):
    """h = dropout(x + x_bias) + residual for one tile, in fp32; rounded to x's dtype (and stored
    when STORE_H) when anything is fused, so it equals what backward reads."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        v += tl.load(xb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        keep = _keep(col0, rows, k0, k1, threshold, v.shape[0], v.shape[1])
        v = tl.where(keep, v * scale, 0.0)
    if HAS_RESIDUAL:
        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS or HAS_DROPOUT or HAS_RESIDUAL:
        hq = cast_rne(v, x_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + offs, hq, mask=mask)
        v = hq.to(tl.float32)
    return v


# The row count is not specialized: a new batch shape never recompiles.
@triton.jit(do_not_specialize=["rows"])
def _layer_norm_fwd_kernel(
    x_ptr,      # [rows, hidden] x (contiguous)
    w_ptr,      # [hidden] weight or None
    b_ptr,      # [hidden] bias or None
    res_ptr,    # [rows, hidden] residual or None
    xb_ptr,     # [hidden] x_bias or None
    seed_ptr,   # [2] int64 Philox key words, or None
    y_ptr,      # [rows, hidden] output, x's dtype
    mean_ptr,   # [rows] fp32
    rstd_ptr,   # [rows] fp32
    h_ptr,      # [rows, hidden] pre-norm sum h, x's dtype, or None
    rows, hidden, eps, threshold, scale,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_XBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    row_idx = _tile_rows(tl.program_id(0), BLOCK_M)
    row_mask = row_idx < rows
    k0 = 0
    k1 = 0
    if HAS_DROPOUT:
        k0, k1 = philox_seed(seed_ptr)
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        mask = row_mask[:, None] & col_mask[None, :]
        offs = _offsets(row_idx, cols, hidden)
        v = _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, row_idx, cols, 0, mask, col_mask, k0, k1, threshold,
                      scale, HAS_XBIAS, HAS_DROPOUT, HAS_RESIDUAL, STORE_H)
        mean = tl.sum(v, axis=1) / hidden
        d = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / hidden
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        out = d * rstd[:, None]
        if HAS_WEIGHT:
            out = out * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, cast_rne(out, y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: per-chunk (count, mean, M2), merged pairwise (Chan et al.); h stored here.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < hidden
            mask = row_mask[:, None] & col_mask[None, :]
            offs = _offsets(row_idx, cols, hidden)
            v = _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, row_idx, cols, c * BLOCK_N, mask, col_mask, k0, k1,
                          threshold, scale, HAS_XBIAS, HAS_DROPOUT, HAS_RESIDUAL, STORE_H)
            n_a = c * BLOCK_N * 1.0  # elements merged so far (earlier chunks are full)
            n_b = tl.sum(col_mask.to(tl.float32), axis=0)
            mean_b = tl.sum(v, axis=1) / n_b
            d = tl.where(mask, v - mean_b[:, None], 0.0)
            delta = mean_b - mean
            mean = mean + delta * (n_b / (n_a + n_b))
            m2 = m2 + tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
        rstd = 1.0 / tl.sqrt_rn(m2 / hidden + eps)
        # Pass 2: recompute h (bit-identical, including the dropout mask) and normalise.
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < hidden
            mask = row_mask[:, None] & col_mask[None, :]
            offs = _offsets(row_idx, cols, hidden)
            v = _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, row_idx, cols, c * BLOCK_N, mask, col_mask, k0, k1,
                          threshold, scale, HAS_XBIAS, HAS_DROPOUT, HAS_RESIDUAL, False)
            out = (v - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                out = out * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                out = out + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs, cast_rne(out, y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row_idx, mean, mask=row_mask)
    tl.store(rstd_ptr + row_idx, rstd, mask=row_mask)


@triton.jit
def _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, g = dy * weight) of one tile in fp32; zero on masked lanes."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, g


@triton.jit
def _bwd_inputs(dh, dx_ptr, dres_ptr, offs, row_idx, cols, col0, mask, k0, k1, threshold, scale,
                HAS_DRESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Store dresidual = dh and dx = dh * keep * scale; returns dx in fp32."""
    if HAS_DRESIDUAL:
        tl.store(dres_ptr + offs, cast_rne(dh, dres_ptr.dtype.element_ty), mask=mask)
    dx = dh
    if HAS_DROPOUT:
        keep = _keep(col0, row_idx, k0, k1, threshold, dh.shape[0], dh.shape[1])
        dx = tl.where(keep, dh * scale, 0.0)
    tl.store(dx_ptr + offs, cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)
    return dx


@triton.jit(do_not_specialize=["rows", "num_tiles"])
def _layer_norm_bwd_kernel(
    dy_ptr,     # [rows, hidden] upstream gradient (contiguous)
    h_ptr,      # [rows, hidden] pre-norm sum saved by forward (x when nothing is fused)
    w_ptr,      # [hidden] weight or None
    mean_ptr,   # [rows] fp32
    rstd_ptr,   # [rows] fp32
    seed_ptr,   # [2] int64 Philox key words, or None
    dx_ptr,     # [rows, hidden] gradient of x, x's dtype
    dres_ptr,   # [rows, hidden] gradient of residual, or None
    part_ptr,   # [3, P, hidden] fp32 partial sums: dweight, dbias, dx_bias (None when none is needed)
    rows, hidden, num_tiles, threshold, scale,
    HAS_WEIGHT: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DXBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    if NEED_DWEIGHT or NEED_DBIAS or NEED_DXBIAS:
        part_stride = num_progs.to(tl.int64) * hidden  # between the three partial-sum slots
        part_row = part_ptr + pid.to(tl.int64) * hidden
    k0 = 0
    k1 = 0
    if HAS_DROPOUT:
        k0, k1 = philox_seed(seed_ptr)
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_dxb = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, num_progs):
            row_idx = _tile_rows(tile, BLOCK_M)
            row_mask = row_idx < rows
            mask = row_mask[:, None] & col_mask[None, :]
            offs = _offsets(row_idx, cols, hidden)
            mean = tl.load(mean_ptr + row_idx, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_idx, mask=row_mask, other=0.0)
            dy, xhat, g = _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT)
            c1 = tl.sum(g, axis=1) / hidden
            c2 = tl.sum(g * xhat, axis=1) / hidden
            dh = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            dx = _bwd_inputs(dh, dx_ptr, dres_ptr, offs, row_idx, cols, 0, mask, k0, k1, threshold, scale,
                             HAS_DRESIDUAL, HAS_DROPOUT)
            if NEED_DWEIGHT:
                acc_dw += tl.sum(dy * xhat, axis=0)
            if NEED_DBIAS:
                acc_db += tl.sum(dy, axis=0)
            if NEED_DXBIAS:
                acc_dxb += tl.sum(tl.where(mask, dx, 0.0), axis=0)
        if NEED_DWEIGHT:
            tl.store(part_row + cols, acc_dw, mask=col_mask)
        if NEED_DBIAS:
            tl.store(part_row + part_stride + cols, acc_db, mask=col_mask)
        if NEED_DXBIAS:
            tl.store(part_row + 2 * part_stride + cols, acc_dxb, mask=col_mask)
    else:
        # Wide rows, one row per tile: partial sums live in this program's workspace row and are
        # updated chunk by chunk (load, add, store; barriers order the same program's accesses).
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < hidden
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            if NEED_DWEIGHT:
                tl.store(part_row + cols, zero, mask=col_mask)
            if NEED_DBIAS:
                tl.store(part_row + part_stride + cols, zero, mask=col_mask)
            if NEED_DXBIAS:
                tl.store(part_row + 2 * part_stride + cols, zero, mask=col_mask)
        tl.debug_barrier()
        for tile in range(pid, num_tiles, num_progs):
            row_idx = _tile_rows(tile, BLOCK_M)
            row_mask = row_idx < rows
            mean = tl.load(mean_ptr + row_idx, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_idx, mask=row_mask, other=0.0)
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
                col_mask = cols < hidden
                mask = row_mask[:, None] & col_mask[None, :]
                offs = _offsets(row_idx, cols, hidden)
                dy, xhat, g = _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT)
                c1 += tl.sum(g, axis=1)
                c2 += tl.sum(g * xhat, axis=1)
            c1 = c1 / hidden
            c2 = c2 / hidden
            for c in range(NUM_CHUNKS):
                cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
                col_mask = cols < hidden
                mask = row_mask[:, None] & col_mask[None, :]
                offs = _offsets(row_idx, cols, hidden)
                dy, xhat, g = _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT)
                dh = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                dx = _bwd_inputs(dh, dx_ptr, dres_ptr, offs, row_idx, cols, c * BLOCK_N, mask, k0, k1, threshold, scale,
                                 HAS_DRESIDUAL, HAS_DROPOUT)
                if NEED_DWEIGHT:
                    p = part_row + cols
                    tl.store(p, tl.load(p, mask=col_mask, other=0.0) + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if NEED_DBIAS:
                    p = part_row + part_stride + cols
                    tl.store(p, tl.load(p, mask=col_mask, other=0.0) + tl.sum(dy, axis=0), mask=col_mask)
                if NEED_DXBIAS:
                    p = part_row + 2 * part_stride + cols
                    tl.store(p, tl.load(p, mask=col_mask, other=0.0) + tl.sum(tl.where(mask, dx, 0.0), axis=0),
                             mask=col_mask)
                tl.debug_barrier()


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, scale) for the kernels; (0, 1.0) without dropout."""
    if dropout_p > 0.0:
        return dropout_threshold(dropout_p), dropout_scale(dropout_p)
    return 0, 1.0


def fwd_launch(x, weight, bias, residual, x_bias, seed, y, mean, rstd, h, *, rows: int, hidden: int,
               eps: float, dropout_p: float, config: Config | None = None):
    """``(grid, kwargs)`` of the forward launch; the launcher and ``aot_variants`` both build it here,
    so the ahead-of-time compile sees the arguments (and specialization) that run."""
    cfg = config or fwd_config(hidden)
    threshold, scale = _dropout_args(dropout_p)
    kwargs = dict(
        x_ptr=x, w_ptr=weight, b_ptr=bias, res_ptr=residual, xb_ptr=x_bias,
        seed_ptr=seed if dropout_p > 0.0 else None, y_ptr=y, mean_ptr=mean, rstd_ptr=rstd, h_ptr=h,
        rows=rows, hidden=hidden, eps=float(eps), threshold=threshold, scale=scale,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_XBIAS=x_bias is not None, HAS_DROPOUT=dropout_p > 0.0, STORE_H=h is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_CHUNKS=cfg.num_chunks, num_warps=cfg.num_warps)
    return (triton.cdiv(rows, cfg.block_m),), kwargs


def _num_programs(device, num_tiles: int) -> int:
    """Backward programs: enough to fill the GPU (4 per SM), never more than there are row tiles."""
    if getattr(device, "type", None) == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, 4 * sms))
    return max(1, min(num_tiles, 8))


def bwd_launch(dy, h, weight, mean, rstd, seed, dx, dresidual, partials, *, rows: int, hidden: int,
               dropout_p: float, need_dweight: bool, need_dbias: bool, need_dx_bias: bool,
               num_programs: int, config: Config | None = None):
    """``(grid, kwargs)`` of the backward launch (see :func:`fwd_launch`)."""
    cfg = config or bwd_config(hidden)
    threshold, scale = _dropout_args(dropout_p)
    kwargs = dict(
        dy_ptr=dy, h_ptr=h, w_ptr=weight, mean_ptr=mean, rstd_ptr=rstd,
        seed_ptr=seed if dropout_p > 0.0 else None, dx_ptr=dx, dres_ptr=dresidual, part_ptr=partials,
        rows=rows, hidden=hidden, num_tiles=triton.cdiv(rows, cfg.block_m), threshold=threshold, scale=scale,
        HAS_WEIGHT=weight is not None, HAS_DRESIDUAL=dresidual is not None, HAS_DROPOUT=dropout_p > 0.0,
        NEED_DWEIGHT=need_dweight, NEED_DBIAS=need_dbias, NEED_DXBIAS=need_dx_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_CHUNKS=cfg.num_chunks, num_warps=cfg.num_warps)
    return (num_programs,), kwargs


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed,
                   config: Config | None = None):
    """Backend entry point (see ``fastbert.backends``): writes y, mean, rstd and, when fused, h.

    ``config`` overrides the heuristic tile (tests use it to force the chunked path).
    """
    rows, hidden = x.shape
    grid, kwargs = fwd_launch(x, weight, bias, residual, x_bias, seed, y, mean, rstd, h, rows=rows,
                              hidden=hidden, eps=eps, dropout_p=dropout_p, config=config)
    with device_ctx(x):
        _layer_norm_fwd_kernel[grid](**kwargs)


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p, seed,
                   config: Config | None = None):
    """Backend entry point: writes dx, dresidual and the fp32 row sums dweight, dbias, dx_bias.

    Workspace: ``[3, P, hidden]`` fp32 partial sums (P = backward programs, at most 4 per SM),
    allocated from torch's allocator when any row sum is asked for.
    """
    rows, hidden = h.shape
    cfg = config or bwd_config(hidden)
    num_tiles = triton.cdiv(rows, cfg.block_m)
    progs = _num_programs(h.device, num_tiles)
    sums = (dweight, dbias, dx_bias)
    partials = None
    if any(t is not None for t in sums):
        partials = workspace((3, progs, hidden), torch.float32, h.device)
    grid, kwargs = bwd_launch(dy, h, weight, mean, rstd, seed, dx, dresidual, partials, rows=rows,
                              hidden=hidden, dropout_p=dropout_p, need_dweight=dweight is not None,
                              need_dbias=dbias is not None, need_dx_bias=dx_bias is not None,
                              num_programs=progs, config=cfg)
    with device_ctx(h):
        _layer_norm_bwd_kernel[grid](**kwargs)
    for slot, out in enumerate(sums):
        if out is not None:
            torch.sum(partials[slot], dim=0, out=out)  # fixed-order reduction: deterministic


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants (``fastbert.backends.triton._aot``): every fusion on, the
    register tile (hidden 1024, 4096) and the chunked path (hidden 16384), fp16 and bf16
    (fp32 too with ``full``). Spill budget 0 everywhere."""
    from fastbert.backends.triton._aot import AotVariant, pointer, split_launch

    dtypes = (torch.float16, torch.bfloat16, torch.float32) if full else (torch.float16, torch.bfloat16)
    hiddens = (384, 768, 1023, 1024, 1536, 4096, 16384) if full else (1024, 4096, 16384)
    out = []
    for dt in dtypes:
        for hidden in hiddens:
            rows = 4096
            t, f32, seed = pointer(dt), pointer(torch.float32), pointer(torch.int64)
            _, fkw = fwd_launch(t, f32, f32, t, t, seed, t, f32, f32, t, rows=rows, hidden=hidden, eps=1e-12,
                                dropout_p=0.1)
            out.append(AotVariant(f"layer_norm_fwd {str(dt)[6:]} hidden={hidden}", _layer_norm_fwd_kernel,
                                  *split_launch(_layer_norm_fwd_kernel, fkw)))
            _, bkw = bwd_launch(t, t, f32, f32, f32, seed, t, t, f32, rows=rows, hidden=hidden, dropout_p=0.1,
                                need_dweight=True, need_dbias=True, need_dx_bias=True, num_programs=528)
            out.append(AotVariant(f"layer_norm_bwd {str(dt)[6:]} hidden={hidden}", _layer_norm_bwd_kernel,
                                  *split_launch(_layer_norm_bwd_kernel, bkw)))
    return out
