"""Triton LayerNorm backward kernel (dx, dresidual and deterministic fp32 partial row sums for
dweight, dbias, dx_bias; the derivation in :mod:`.layer_norm`) and its launch arguments."""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends.triton._common import _tile_rows, cast_rne
from fastbert.backends.triton._layer_norm_common import (Config, _chunk, _dropout_args, _dropout_key, _keep,
                                                         bwd_config)

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


@triton.jit
def _store_partial(p, v, col_mask, ACCUMULATE: tl.constexpr):
    """Store ``v`` at ``p`` (ACCUMULATE: ``*p + v``)."""
    if ACCUMULATE:
        v = tl.load(p, mask=col_mask, other=0.0) + v
    tl.store(p, v, mask=col_mask)


@triton.jit
def _store_partials(part_ptr, hidden, cols, col_mask, dw, db, dxb, NEED_DWEIGHT: tl.constexpr,
                    NEED_DBIAS: tl.constexpr, NEED_DXBIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write (ACCUMULATE: add to) this program's partial column sums of dweight, dbias and dx_bias
    at ``cols``: row ``program_id`` of the three ``[P, hidden]`` slots of the workspace. Only the
    sums asked for are touched (the others are dead code, removed by the compiler)."""
    if NEED_DWEIGHT or NEED_DBIAS or NEED_DXBIAS:
        row = part_ptr + tl.program_id(0).to(tl.int64) * hidden + cols
        slot = tl.num_programs(0).to(tl.int64) * hidden  # between the three slots
        if NEED_DWEIGHT:
            _store_partial(row, dw, col_mask, ACCUMULATE)
        if NEED_DBIAS:
            _store_partial(row + slot, db, col_mask, ACCUMULATE)
        if NEED_DXBIAS:
            _store_partial(row + 2 * slot, dxb, col_mask, ACCUMULATE)


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
    k0, k1 = _dropout_key(seed_ptr, HAS_DROPOUT)
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_dxb = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, num_progs):
            row_idx = _tile_rows(tile, BLOCK_M)
            row_mask = row_idx < rows
            _, _, mask, offs = _chunk(row_idx, row_mask, 0, hidden, BLOCK_N)
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
        _store_partials(part_ptr, hidden, cols, col_mask, acc_dw, acc_db, acc_dxb, NEED_DWEIGHT, NEED_DBIAS,
                        NEED_DXBIAS, False)
    else:
        # Wide rows, one row per tile: partial sums live in this program's workspace row and are
        # updated chunk by chunk (load, add, store; barriers order the same program's accesses).
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            _store_partials(part_ptr, hidden, cols, cols < hidden, zero, zero, zero, NEED_DWEIGHT, NEED_DBIAS,
                            NEED_DXBIAS, False)
        tl.debug_barrier()
        for tile in range(pid, num_tiles, num_progs):
            row_idx = _tile_rows(tile, BLOCK_M)
            row_mask = row_idx < rows
            mean = tl.load(mean_ptr + row_idx, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_idx, mask=row_mask, other=0.0)
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                cols, col_mask, mask, offs = _chunk(row_idx, row_mask, c, hidden, BLOCK_N)
                dy, xhat, g = _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT)
                c1 += tl.sum(g, axis=1)
                c2 += tl.sum(g * xhat, axis=1)
            c1 = c1 / hidden
            c2 = c2 / hidden
            for c in range(NUM_CHUNKS):
                cols, col_mask, mask, offs = _chunk(row_idx, row_mask, c, hidden, BLOCK_N)
                dy, xhat, g = _bwd_tile(dy_ptr, h_ptr, w_ptr, offs, cols, mask, col_mask, mean, rstd, HAS_WEIGHT)
                dh = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                dx = _bwd_inputs(dh, dx_ptr, dres_ptr, offs, row_idx, cols, c * BLOCK_N, mask, k0, k1, threshold, scale,
                                 HAS_DRESIDUAL, HAS_DROPOUT)
                _store_partials(part_ptr, hidden, cols, col_mask, tl.sum(dy * xhat, axis=0), tl.sum(dy, axis=0),
                                tl.sum(tl.where(mask, dx, 0.0), axis=0), NEED_DWEIGHT, NEED_DBIAS, NEED_DXBIAS, True)
                tl.debug_barrier()


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
