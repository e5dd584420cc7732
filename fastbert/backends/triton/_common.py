"""Pieces every compute module of the Triton backend shares (attention, layer_norm, gelu).

- :data:`INTERPRET`: whether kernels run under ``TRITON_INTERPRET=1``. Kernels are defined once per
  process and the variable applies to the whole process (tests set it before importing).
- :data:`TILE_SCALE`: the interpreter's cost is per operation, not per element, so the row-wise
  kernels (LayerNorm, GELU) run the same code on 16x taller tiles there (the tile height is a free
  parameter of those kernels) and CPU tests stay fast.
- :func:`cast_rne`: an fp32 -> fp16/bf16 store cast that rounds like compiled Triton under the
  interpreter too.
- :func:`_tile_rows`: the int64 row indices of a row tile (the row-wise kernels' prologue);
  :func:`_col_block`: the columns of a column block and which are inside the row.
- :func:`device_ctx`: launches run on the tensors' GPU, not the current one.
- :func:`row_programs`: how many row programs a backward with per-program partial sums runs.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILE_SCALE = 16 if INTERPRET else 1

_INTERPRET_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 ``v`` to ``dtype``, rounding to nearest even (what compiled Triton does).

    Triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding; only there, bf16 is
    rounded by hand on the bit pattern (add 0x7FFF plus the lowest kept bit, keep the high half),
    so CPU tests see the values a GPU stores. fp16 and the compiled path use the plain cast.
    """
    if _INTERPRET_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _tile_rows(tile, BLOCK_M: tl.constexpr):
    """Row indices of row tile ``tile`` as int64, so ``row * hidden`` cannot overflow int32 (the row
    index itself fits in int32: fewer than 2**31 rows)."""
    return (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)


@triton.jit
def _col_block(c, width, BLOCK_N: tl.constexpr):
    """``(cols, col_mask)``: the columns ``c * BLOCK_N + arange(BLOCK_N)`` of column block ``c`` and
    which of them are inside a row of ``width`` (GELU / GeGLU: ``c`` = grid axis 1; LayerNorm's
    ``_chunk``: its chunk loop)."""
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < width


def row_programs(device, num_tiles: int, col_blocks: int = 1) -> int:
    """Row programs per column block of a backward that keeps fp32 partial sums per program: enough
    to fill the GPU (4 per SM over the ``col_blocks`` column blocks), 8 on the CPU, never more than
    there are row tiles."""
    if getattr(device, "type", None) == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, triton.cdiv(4 * sms, col_blocks)))
    return max(1, min(num_tiles, 8))


def device_ctx(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
