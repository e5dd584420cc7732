"""Triton LayerNorm forward kernel (add & norm: ``h = dropout(x + x_bias) + residual``, then the
normalisation; math and numerics in :mod:`.layer_norm`) and its launch arguments."""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends.triton._common import _tile_rows, cast_rne
from fastbert.backends.triton._layer_norm_common import (Config, _chunk, _dropout_args, _dropout_key, _keep,
                                                         fwd_config)

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


@triton.jit
def _store_y(y_ptr, w_ptr, b_ptr, xhat, offs, cols, mask, col_mask, HAS_WEIGHT: tl.constexpr,
             HAS_BIAS: tl.constexpr):
    """Store ``y = xhat * weight + bias`` (fp32 ``xhat``, the normalised tile) in y's dtype."""
    if HAS_WEIGHT:
        xhat = xhat * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        xhat = xhat + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, cast_rne(xhat, y_ptr.dtype.element_ty), mask=mask)


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
    k0, k1 = _dropout_key(seed_ptr, HAS_DROPOUT)
    if NUM_CHUNKS == 1:
        cols, col_mask, mask, offs = _chunk(row_idx, row_mask, 0, hidden, BLOCK_N)
        v = _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, row_idx, cols, 0, mask, col_mask, k0, k1, threshold,
                      scale, HAS_XBIAS, HAS_DROPOUT, HAS_RESIDUAL, STORE_H)
        mean = tl.sum(v, axis=1) / hidden
        d = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / hidden
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        _store_y(y_ptr, w_ptr, b_ptr, d * rstd[:, None], offs, cols, mask, col_mask, HAS_WEIGHT, HAS_BIAS)
    else:
        # Pass 1: per-chunk (count, mean, M2), merged pairwise (Chan et al.); h stored here.
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols, col_mask, mask, offs = _chunk(row_idx, row_mask, c, hidden, BLOCK_N)
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
            cols, col_mask, mask, offs = _chunk(row_idx, row_mask, c, hidden, BLOCK_N)
            v = _pre_norm(x_ptr, xb_ptr, res_ptr, h_ptr, offs, row_idx, cols, c * BLOCK_N, mask, col_mask, k0, k1,
                          threshold, scale, HAS_XBIAS, HAS_DROPOUT, HAS_RESIDUAL, False)
            _store_y(y_ptr, w_ptr, b_ptr, (v - mean[:, None]) * rstd[:, None], offs, cols, mask, col_mask,
                     HAS_WEIGHT, HAS_BIAS)
    tl.store(mean_ptr + row_idx, mean, mask=row_mask)
    tl.store(rstd_ptr + row_idx, rstd, mask=row_mask)


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
