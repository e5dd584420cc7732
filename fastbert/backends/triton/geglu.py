"""Triton GeGLU with a fused bias, forward and backward (the ``triton`` backend's compute module for
``geglu``).

GeGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 with GELU for the sigmoid) on
``z = x + bias`` split in halves ``a = z[:, :n]`` (through GELU) and ``g = z[:, n:]`` (the gate)::

    y  = gelu(a) * g
    da = dy * g * gelu'(a),   dg = dy * gelu(a),   dx = [da, dg],   dbias = sum_rows(dx)

GELU and its derivative are :mod:`fastbert.backends.triton.gelu`'s (exact erf with the erfc tail
for ``a < -1``, or the tanh form written as ``a * sigmoid(2u)``; the same accuracy notes), all in
fp32, stored once in x's dtype.

Forward tiles ``[BLOCK_M rows, BLOCK_N columns of y]`` and reads the matching columns of both
halves. Backward: ``P`` row programs per column block walk a fixed set of row tiles and keep fp32
partial sums of ``dbias`` (both halves), written to a ``[P, 2n]`` fp32 workspace (torch's allocator)
and summed by ``torch.sum`` in a fixed order: deterministic, no atomics. Each backward program reads
the x elements it overwrites before writing them, so ``dx`` may alias ``x``. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.backends.triton._common import _col_block, _tile_rows, cast_rne, device_ctx
from fastbert.backends.triton.gelu import _gelu_and_grad, config, run_bwd, tile_launch


@triton.jit
def _load_halves(x_ptr, b_ptr, row_idx, cols, n, mask, col_mask, HAS_BIAS: tl.constexpr):
    """``(a, g)`` in fp32 for rows ``row_idx`` and columns ``cols`` of each half, biases added."""
    offs = row_idx[:, None] * (2 * n) + cols[None, :]
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + offs + n, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        g += tl.load(b_ptr + n + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return a, g, offs


@triton.jit(do_not_specialize=["rows"])
def _geglu_fwd_kernel(
    x_ptr,  # [rows, 2n] input (contiguous)
    b_ptr,  # [2n] bias or None
    y_ptr,  # [rows, n] output, x's dtype
    rows, n,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_idx = _tile_rows(tl.program_id(0), BLOCK_M)
    cols, col_mask = _col_block(tl.program_id(1), n, BLOCK_N)
    mask = (row_idx < rows)[:, None] & col_mask[None, :]
    a, g, _ = _load_halves(x_ptr, b_ptr, row_idx, cols, n, mask, col_mask, HAS_BIAS)
    ga, _ = _gelu_and_grad(a, APPROX_TANH, False)
    tl.store(y_ptr + row_idx[:, None] * n + cols[None, :], cast_rne(ga * g, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "num_tiles"])
def _geglu_bwd_kernel(
    dy_ptr,    # [rows, n] upstream gradient (contiguous)
    x_ptr,     # [rows, 2n] forward input
    b_ptr,     # [2n] bias or None
    dx_ptr,    # [rows, 2n] gradient of x, x's dtype (may be x itself)
    part_ptr,  # [P, 2n] fp32 partial sums of dbias, or None
    rows, n, num_tiles,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_mask = _col_block(tl.program_id(1), n, BLOCK_N)
    acc_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        row_idx = _tile_rows(tile, BLOCK_M)
        mask = (row_idx < rows)[:, None] & col_mask[None, :]
        a, g, offs = _load_halves(x_ptr, b_ptr, row_idx, cols, n, mask, col_mask, HAS_BIAS)
        dy = tl.load(dy_ptr + row_idx[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ga, grad = _gelu_and_grad(a, APPROX_TANH, True)
        da = dy * g * grad
        dg = dy * ga
        tl.store(dx_ptr + offs, cast_rne(da, dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs + n, cast_rne(dg, dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DBIAS:  # masked lanes have dy = 0
            acc_a += tl.sum(da, axis=0)
            acc_g += tl.sum(dg, axis=0)
    if NEED_DBIAS:
        base = part_ptr + pid.to(tl.int64) * (2 * n)
        tl.store(base + cols, acc_a, mask=col_mask)
        tl.store(base + n + cols, acc_g, mask=col_mask)


def fwd_launch(x, bias, y, *, rows: int, n: int, approximate: str):
    """``(grid, kwargs)`` of the forward launch (shared by the launcher and ``aot_variants``); the
    tile is GELU's for a row of ``n`` (two loads per output element)."""
    return tile_launch(config(n), bias, rows=rows, width=n, approximate=approximate, x_ptr=x, y_ptr=y, n=n)


def bwd_config(n: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of backward: GELU's column blocks, ~2048-element tiles on
    8 warps (forward's 4096 keep a, g, dy and both gradients live: 128 registers and a spill on
    sm_90 for fp16 erf, ``aot_variants``)."""
    block_m, block_n, _ = config(n)
    return max(1, block_m // 2), block_n, 8


def bwd_launch(dy, x, bias, dx, partials, *, rows: int, n: int, approximate: str, num_programs: int):
    """``(grid, kwargs)`` of the backward launch; ``partials`` is ``[num_programs, 2n]`` fp32 or None."""
    return tile_launch(bwd_config(n), bias, rows=rows, width=n, approximate=approximate, num_programs=num_programs,
                       dy_ptr=dy, x_ptr=x, dx_ptr=dx, part_ptr=partials, n=n)


def geglu_fwd(x, bias, y, *, approximate):
    """Backend entry point (see ``fastbert.backends``): ``y = gelu(a) * g``, ``a, g = x + bias``
    split in halves."""
    rows, n = y.shape
    grid, kwargs = fwd_launch(x, bias, y, rows=rows, n=n, approximate=approximate)
    with device_ctx(x):
        _geglu_fwd_kernel[grid](**kwargs)


def geglu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: ``dx = [dy * g * gelu'(a), dy * gelu(a)]``; ``dbias = sum_rows(dx)``
    (fp32) when asked. ``dx`` may alias ``x``.

    Workspace: ``[P, 2n]`` fp32 partial sums of dbias (P row programs: up to 4 per SM over the
    column blocks on a GPU, 8 on the CPU).
    """
    n = dy.shape[1]
    run_bwd(_geglu_bwd_kernel, bwd_launch, bwd_config(n), dy, x, bias, dx, dbias, width=n, part_width=2 * n, n=n,
            approximate=approximate)


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants: bias on, erf and tanh, n = 1152 (ModernBERT-base's
    intermediate size), fp16 and bf16; with ``full`` also fp32 and n = 97, 1536, 2624
    (ModernBERT-large), 4096. Spill budget 0."""
    from fastbert.backends.triton._aot import AotVariant, pointer, split_launch

    dtypes = (torch.float16, torch.bfloat16, torch.float32) if full else (torch.float16, torch.bfloat16)
    widths = (97, 1152, 1536, 2624, 4096) if full else (1152,)
    out = []
    for dt in dtypes:
        for n in widths:
            for approximate in ("none", "tanh"):
                t, f32 = pointer(dt), pointer(torch.float32)
                name = f"{str(dt)[6:]} n={n} approximate={approximate}"
                _, fkw = fwd_launch(t, t, t, rows=8192, n=n, approximate=approximate)
                out.append(AotVariant(f"geglu_fwd {name}", _geglu_fwd_kernel, *split_launch(_geglu_fwd_kernel, fkw)))
                _, bkw = bwd_launch(t, t, t, t, f32, rows=8192, n=n, approximate=approximate, num_programs=176)
                out.append(AotVariant(f"geglu_bwd {name}", _geglu_bwd_kernel, *split_launch(_geglu_bwd_kernel, bkw)))
    return out
