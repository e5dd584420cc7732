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

The kernels live in three modules, as for attention: :mod:`._layer_norm_common` (the tile
heuristic, row offsets, the dropout keep mask), :mod:`._layer_norm_fwd` (the forward kernel and
its launch arguments) and :mod:`._layer_norm_bwd` (the backward kernel and its launch arguments).
This module holds the backend entry points (:func:`layer_norm_fwd`, :func:`layer_norm_bwd`;
contract in :mod:`fastbert.backends`) and the ahead-of-time compile variants (:func:`aot_variants`).
"""

from __future__ import annotations

import torch
import triton

from fastbert.backends import workspace
from fastbert.backends.triton._common import _tile_rows, device_ctx, row_programs  # noqa: F401
# The kernels, launchers and configs are re-exported here, where tests and the AOT compile have
# always found them.
from fastbert.backends.triton._layer_norm_bwd import _layer_norm_bwd_kernel, bwd_launch
from fastbert.backends.triton._layer_norm_common import Config, _offsets, bwd_config, fwd_config  # noqa: F401
from fastbert.backends.triton._layer_norm_fwd import _layer_norm_fwd_kernel, fwd_launch


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
    progs = row_programs(h.device, num_tiles)
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
