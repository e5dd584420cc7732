"""Pieces shared by the Triton LayerNorm kernels (forward in ``_layer_norm_fwd``, backward in
``_layer_norm_bwd``, entry points and the math in ``layer_norm``): the tile heuristic, int64
element offsets and column chunks, the dropout key and keep mask of a tile (Philox scheme v2) and the
dropout launch arguments."""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from fastbert.backends._philox import dropout_scale, dropout_threshold
from fastbert.backends.triton._common import TILE_SCALE, _col_block
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
def _offsets(row_idx, cols, hidden):
    """Element offsets ``row * hidden + col`` of a tile, int64 (row_idx is int64)."""
    return row_idx[:, None] * hidden + cols[None, :]


@triton.jit
def _chunk(row_idx, row_mask, c, hidden, BLOCK_N: tl.constexpr):
    """Column chunk ``c`` (columns ``c * BLOCK_N + arange(BLOCK_N)``) of the rows ``row_idx``
    (in bounds where ``row_mask``): ``(cols, col_mask, mask, offs)``, the columns, which are in
    the row, which elements of the tile are, and the tile's int64 element offsets."""
    cols, col_mask = _col_block(c, hidden, BLOCK_N)
    mask = row_mask[:, None] & col_mask[None, :]
    return cols, col_mask, mask, _offsets(row_idx, cols, hidden)


@triton.jit
def _dropout_key(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """The Philox key words ``(k0, k1)`` when HAS_DROPOUT, else ``(0, 0)`` (never read)."""
    if HAS_DROPOUT:
        return philox_seed(seed_ptr)
    else:
        return 0, 0


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


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, scale) for the kernels; (0, 1.0) without dropout."""
    if dropout_p > 0.0:
        return dropout_threshold(dropout_p), dropout_scale(dropout_p)
    return 0, 1.0
