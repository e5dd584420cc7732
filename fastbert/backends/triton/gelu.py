"""Triton GELU with a fused bias, forward and backward (the ``triton`` backend's compute module for
``gelu``).

GELU (Hendrycks & Gimpel 2016, sec. 2), on ``z = x + bias`` in fp32, stored in x's dtype:

- exact: ``gelu(z) = z * Phi(z)``, ``gelu'(z) = Phi(z) + z * phi(z)``;
- tanh form: ``0.5 z (1 + tanh(u))`` with ``u = sqrt(2/pi) (z + 0.044715 z^3)``, written as
  ``z * sigmoid(2u)`` (the same function: ``1 + tanh(u) = 2 sigmoid(2u)``), whose derivative is
  ``s + 2 z s (1 - s) u'`` with ``s = sigmoid(2u)``, ``u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2)``.

``Phi(z) = 0.5 (1 + erf(z / sqrt(2)))`` loses every digit in fp32 for z below about -4 (1 + erf
cancels), which is the range an fp16/bf16 activation can still represent. For ``z < -1`` the
kernel uses ``Phi(z) = 0.5 erfc(-z / sqrt(2))`` with the Chebyshev fit of erfc in Press et al.,
*Numerical Recipes* (2nd ed., sec. 6.2, ``erfcc``: fractional error below 1.2e-7 in exact
arithmetic), so the negative tail keeps its relative precision instead of cancelling to zero.
In fp32 the exponential adds an error that grows with ``z^2``: the fit evaluates
``exp(-z^2 / 2 + poly)``, whose argument (about -50 at z = -10) is rounded to fp32, and on NVIDIA
GPUs ``tl.exp`` is ``ex2.approx`` of ``x * log2(e)``, rounded again; each rounding of an argument
that large costs up to ~2e-6 to 3e-6 relative. The bound is ``eps_fp32 * (16 + z^2)`` relative
(about 4e-6 at z = -4, 1.4e-5 at z = -10): far below fp16/bf16 rounding, tens of fp32 ulps deep
in the tail. ``tests/test_gpu_readiness.py`` checks that bound on a GPU (marked ``gpu``); under
the interpreter (numpy's exp) the CPU tests see a smaller error.

Backward: ``dx = dy * gelu'(z)``; ``dbias = sum_rows(dx)`` in fp32, deterministic: ``P`` row
programs per column block keep fp32 partial sums over a fixed set of row tiles, written to a
``[P, hidden]`` fp32 workspace (torch's allocator) and summed by ``torch.sum`` in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.backends import workspace
from fastbert.backends.triton._common import (TILE_SCALE, _col_block, _tile_rows, cast_rne, device_ctx,
                                              row_programs)

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _phi_cdf(z):
    """Standard normal CDF Phi(z) in fp32, accurate in relative terms in the negative tail."""
    a = tl.abs(z) * _SQRT1_2
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc_a = t * tl.exp(-a * a + poly)  # erfc(|z| / sqrt(2))
    return tl.where(z < -1.0, 0.5 * erfc_a, 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)))


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32; the gradient is 0 when not NEED_GRAD."""
    if APPROX_TANH:
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))  # sigmoid(2u) = (1 + tanh(u)) / 2
        y = z * s
        grad = 0.0
        if NEED_GRAD:
            grad = s + 2.0 * z * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        cdf = _phi_cdf(z)
        y = z * cdf
        grad = 0.0
        if NEED_GRAD:
            grad = cdf + z * (_INV_SQRT_2PI * tl.exp(-0.5 * z * z))
    return y, grad


@triton.jit
def _load_z(x_ptr, b_ptr, offs, cols, mask, col_mask, HAS_BIAS: tl.constexpr):
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit(do_not_specialize=["rows"])
def _gelu_fwd_kernel(
    x_ptr,  # [rows, hidden] input (contiguous)
    b_ptr,  # [hidden] bias or None
    y_ptr,  # [rows, hidden] output, x's dtype
    rows, hidden,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_idx = _tile_rows(tl.program_id(0), BLOCK_M)
    cols, col_mask = _col_block(tl.program_id(1), hidden, BLOCK_N)
    mask = (row_idx < rows)[:, None] & col_mask[None, :]
    offs = row_idx[:, None] * hidden + cols[None, :]
    z = _load_z(x_ptr, b_ptr, offs, cols, mask, col_mask, HAS_BIAS)
    y, _ = _gelu_and_grad(z, APPROX_TANH, False)
    tl.store(y_ptr + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "num_tiles"])
def _gelu_bwd_kernel(
    dy_ptr,    # [rows, hidden] upstream gradient (contiguous)
    x_ptr,     # [rows, hidden] forward input
    b_ptr,     # [hidden] bias or None
    dx_ptr,    # [rows, hidden] gradient of x, x's dtype
    part_ptr,  # [P, hidden] fp32 partial sums of dbias, or None
    rows, hidden, num_tiles,
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_mask = _col_block(tl.program_id(1), hidden, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        row_idx = _tile_rows(tile, BLOCK_M)
        mask = (row_idx < rows)[:, None] & col_mask[None, :]
        offs = row_idx[:, None] * hidden + cols[None, :]
        z = _load_z(x_ptr, b_ptr, offs, cols, mask, col_mask, HAS_BIAS)
        _, grad = _gelu_and_grad(z, APPROX_TANH, True)
        dx = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad
        tl.store(dx_ptr + offs, cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DBIAS:
            acc += tl.sum(dx, axis=0)  # masked lanes have dy = 0
    if NEED_DBIAS:
        tl.store(part_ptr + pid.to(tl.int64) * hidden + cols, acc, mask=col_mask)


def config(hidden: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: column blocks of up to 1024, ~4096-element tiles."""
    block_n = min(triton.next_power_of_2(hidden), 1024)
    block_m = max(1, 4096 // block_n) * TILE_SCALE
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def tile_launch(cfg, bias, *, rows: int, width: int, approximate: str, num_programs: int | None = None, **args):
    """``(grid, kwargs)`` of a launch of GELU's or GeGLU's kernels, which take the same arguments
    but for the row width's name (``hidden`` / ``n``, in ``args`` with the tensors): the tile
    ``cfg = (BLOCK_M, BLOCK_N, num_warps)`` over ``rows`` x ``width`` output columns. Forward (one
    program per row tile) when ``num_programs`` is None; else backward: ``num_programs`` row
    programs per column block walking the row tiles, dbias partial sums when ``part_ptr`` is set."""
    block_m, block_n, num_warps = cfg
    kwargs = dict(args, b_ptr=bias, rows=rows, HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if num_programs is None:
        return (triton.cdiv(rows, block_m), triton.cdiv(width, block_n)), kwargs
    kwargs.update(num_tiles=triton.cdiv(rows, block_m), NEED_DBIAS=args["part_ptr"] is not None)
    return (num_programs, triton.cdiv(width, block_n)), kwargs


def fwd_launch(x, bias, y, *, rows: int, hidden: int, approximate: str):
    """``(grid, kwargs)`` of the forward launch (shared by the launcher and ``aot_variants``)."""
    return tile_launch(config(hidden), bias, rows=rows, width=hidden, approximate=approximate, x_ptr=x, y_ptr=y,
                       hidden=hidden)


def bwd_launch(dy, x, bias, dx, partials, *, rows: int, hidden: int, approximate: str, num_programs: int):
    """``(grid, kwargs)`` of the backward launch; ``partials`` is ``[num_programs, hidden]`` fp32 or None."""
    return tile_launch(config(hidden), bias, rows=rows, width=hidden, approximate=approximate,
                       num_programs=num_programs, dy_ptr=dy, x_ptr=x, dx_ptr=dx, part_ptr=partials, hidden=hidden)


def run_bwd(kernel, launch, cfg, dy, x, bias, dx, dbias, *, width: int, part_width: int, **args):
    """Run GELU's or GeGLU's backward ``kernel``: :func:`row_programs` row programs per column block
    of the tile ``cfg`` over ``width`` columns; when ``dbias`` is asked for, their fp32 partial sums
    in a ``[P, part_width]`` workspace, summed into ``dbias`` in a fixed order (deterministic).
    ``launch`` is the kernel's ``bwd_launch``, given the tensors, the workspace and ``args``."""
    rows = dy.shape[0]
    block_m, block_n, _ = cfg
    progs = row_programs(x.device, triton.cdiv(rows, block_m), triton.cdiv(width, block_n))
    partials = workspace((progs, part_width), torch.float32, x.device) if dbias is not None else None
    grid, kwargs = launch(dy, x, bias, dx, partials, rows=rows, num_programs=progs, **args)
    with device_ctx(x):
        kernel[grid](**kwargs)
    if dbias is not None:
        torch.sum(partials, dim=0, out=dbias)  # fixed-order reduction: deterministic


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point (see ``fastbert.backends``): ``y = gelu(x + bias)``."""
    rows, hidden = x.shape
    grid, kwargs = fwd_launch(x, bias, y, rows=rows, hidden=hidden, approximate=approximate)
    with device_ctx(x):
        _gelu_fwd_kernel[grid](**kwargs)


def gelu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: ``dx = dy * gelu'(x + bias)``; ``dbias = sum_rows(dx)`` (fp32) when asked.

    Workspace: ``[P, hidden]`` fp32 partial sums of dbias (P row programs: up to 4 per SM over the
    column blocks on a GPU).
    """
    hidden = x.shape[1]
    run_bwd(_gelu_bwd_kernel, bwd_launch, config(hidden), dy, x, bias, dx, dbias, width=hidden, part_width=hidden,
            hidden=hidden, approximate=approximate)


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants: bias on, erf and tanh, hidden 3072 (BERT-base FFN) and 4096,
    fp16 and bf16 (fp32 and more widths with ``full``). Spill budget 0."""
    from fastbert.backends.triton._aot import AotVariant, pointer, split_launch

    dtypes = (torch.float16, torch.bfloat16, torch.float32) if full else (torch.float16, torch.bfloat16)
    hiddens = (384, 1023, 1536, 3072, 4096) if full else (3072,)
    out = []
    for dt in dtypes:
        for hidden in hiddens:
            for approximate in ("none", "tanh"):
                t, f32 = pointer(dt), pointer(torch.float32)
                _, fkw = fwd_launch(t, t, t, rows=4096, hidden=hidden, approximate=approximate)
                name = f"{str(dt)[6:]} hidden={hidden} approximate={approximate}"
                out.append(AotVariant(f"gelu_fwd {name}", _gelu_fwd_kernel, *split_launch(_gelu_fwd_kernel, fkw)))
                _, bkw = bwd_launch(t, t, t, t, f32, rows=4096, hidden=hidden, approximate=approximate,
                                    num_programs=176)
                out.append(AotVariant(f"gelu_bwd {name}", _gelu_bwd_kernel, *split_launch(_gelu_bwd_kernel, bkw)))
    return out
