"""Philox4x32-10 dropout masks for Triton kernels, bit-identical to :mod:`fastbert.backends._philox`.

The shared dropout scheme, version 2 (specified once, in fastbert/backends/_philox.py): one
Philox4x32-10 call per group of 8 consecutive columns, counter = the group's logical coordinates
(attention ``(key column // 8, query row, head, sequence)``; LayerNorm ``(column // 8, row &
0xFFFFFFFF, row >> 32, 0)``), key = the two uint32 seed words that ``fastbert.ops`` draws per
call; column ``j`` is kept iff the 16-bit half ``j % 2`` of output word ``(j % 8) // 2`` is
``>= dropout_threshold(dropout_p)`` (a 16-bit threshold computed on the host and passed to the
kernel as an integer argument).

:func:`philox_keep_tile` draws a ``[BLOCK_M, BLOCK_N]`` tile whose first column is a multiple of
8 with one call per 8-column group: the rounds run on a ``[BLOCK_M, BLOCK_N // 8]`` tile and the
eight 16-bit halves of each call are compared and interleaved back into columns with ``tl.join``
/ ``tl.reshape`` (8x fewer rounds than one call per element). :func:`philox_keep_cols` is the
per-element form for tiles narrower than 8 columns.

Source: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (Philox4x32-10).
Each round multiplies two counter words by fixed 32-bit constants, uses the high halves
(``tl.umulhi``) XOR the other words and the round key, the low halves as the new odd words, and
bumps the key by the Weyl constants. All arithmetic is uint32 and wraps modulo 2**32.

Usage in a kernel::

    from fastbert.backends.triton._philox import philox_keep_tile, philox_seed
    k0, k1 = philox_seed(seed_ptr)                        # seed_ptr: int64 [2]
    keep = philox_keep_tile(col0, rows[:, None], h, b, k0, k1, threshold, BLOCK_M, BLOCK_N)
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends._philox import (PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1,
                                       dropout_threshold)

__all__ = ["philox4x32", "philox_keep_tile", "philox_keep_cols", "philox_seed", "dropout_threshold"]

# Module-level constexprs so the jitted functions see the same constants as the torch version.
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """The four output words of Philox4x32-10 for counter ``(c0, c1, c2, c3)`` and key ``(k0, k1)``.

    Arguments are integer scalars or tensors (broadcastable; int32/int64 values are reduced to
    their low 32 bits); returns four uint32 values with their broadcast shape.
    """
    # tl.cast (a builtin, not a nested jit call: cheap under the interpreter) keeps the low 32 bits.
    c0 = tl.cast(c0, tl.uint32)
    c1 = tl.cast(c1, tl.uint32)
    c2 = tl.cast(c2, tl.uint32)
    c3 = tl.cast(c3, tl.uint32)
    k0 = tl.cast(k0, tl.uint32)
    k1 = tl.cast(k1, tl.uint32)
    m0 = tl.cast(_M0, tl.uint32)
    m1 = tl.cast(_M1, tl.uint32)
    w0 = tl.cast(_W0, tl.uint32)
    w1 = tl.cast(_W1, tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def philox_keep_tile(col0, c1, c2, c3, k0, k1, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep mask bool ``[BLOCK_M, BLOCK_N]`` of columns ``col0 .. col0 + BLOCK_N - 1``.

    ``col0``: first column, a multiple of 8 (BLOCK_N a multiple of 8); ``c1, c2, c3``: the other
    counter words, broadcastable to ``[BLOCK_M, 1]``; ``threshold``: ``dropout_threshold(p)``.
    One Philox call per row and 8-column group (counter word 0 = column // 8).
    """
    G: tl.constexpr = BLOCK_N // 8
    g = col0 // 8 + tl.arange(0, G)[None, :]  # [1, G]
    zero = tl.zeros([BLOCK_M, G], dtype=tl.uint32)  # the words take the full [BLOCK_M, G] shape
    w0, w1, w2, w3 = philox4x32(g + zero, c1 + zero, c2, c3, k0, k1)
    t = tl.cast(threshold, tl.uint32)
    # join appends a trailing axis, so join(join(a, c), join(b, d)) flattens to (a, b, c, d):
    # [BLOCK_M, G, word (4), half (2)] -> column 8 g + 2 word + half.
    lo = tl.join(tl.join((w0 & 0xFFFF) >= t, (w2 & 0xFFFF) >= t), tl.join((w1 & 0xFFFF) >= t, (w3 & 0xFFFF) >= t))
    hi = tl.join(tl.join((w0 >> 16) >= t, (w2 >> 16) >= t), tl.join((w1 >> 16) >= t, (w3 >> 16) >= t))
    return tl.reshape(tl.join(lo, hi), [BLOCK_M, BLOCK_N])


@triton.jit
def philox_keep_cols(cols, c1, c2, c3, k0, k1, threshold):
    """Per-element keep decision for any columns ``cols`` (broadcast with ``c1, c2, c3``): one
    call per element, selecting its word and half; for tiles narrower than 8 columns."""
    w0, w1, w2, w3 = philox4x32(cols // 8, c1, c2, c3, k0, k1)
    j = cols % 8
    w = tl.where(j < 4, tl.where(j < 2, w0, w1), tl.where(j < 6, w2, w3))
    u = tl.where(j % 2 == 0, w & 0xFFFF, w >> 16)
    return u >= tl.cast(threshold, tl.uint32)


@triton.jit
def philox_seed(seed_ptr):
    """The key ``(k0, k1)`` as uint32 scalars from ``seed_ptr`` (int64 ``[2]``, one uint32 word each).

    Loaded on the device, so drawing a seed never syncs the host.
    """
    k0 = tl.cast(tl.load(seed_ptr), tl.uint32)
    k1 = tl.cast(tl.load(seed_ptr + 1), tl.uint32)
    return k0, k1


@triton.jit
def _philox_words_kernel(c_ptr,    # int64 [4, n]: counter words (uint32 values)
                         key_ptr,  # int64 [2]: key words (uint32 values)
                         out_ptr,  # int64 [4, n]: the four output words
                         n, BLOCK: tl.constexpr):
    """Test kernel: evaluates :func:`philox4x32` elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c0 = tl.load(c_ptr + offs, mask=valid, other=0)
    c1 = tl.load(c_ptr + n + offs, mask=valid, other=0)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=valid, other=0)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=valid, other=0)
    k0, k1 = philox_seed(key_ptr)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=valid)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=valid)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=valid)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=valid)


@triton.jit
def _philox_keep_kernel(key_ptr,   # int64 [2]: key words
                        keep_ptr,  # int8 [rows, cols]: keep mask of counters (col // 8, row, c2, c3)
                        rows, cols, c2, c3, threshold,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PER_ELEMENT: tl.constexpr):
    """Test kernel: one ``[BLOCK_M, BLOCK_N]`` tile of :func:`philox_keep_tile` (or, with
    PER_ELEMENT, :func:`philox_keep_cols`) per program."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    k0, k1 = philox_seed(key_ptr)
    if PER_ELEMENT:
        keep = philox_keep_cols(offs_n[None, :], offs_m[:, None], c2, c3, k0, k1, threshold)
    else:
        keep = philox_keep_tile(col0, offs_m[:, None], c2, c3, k0, k1, threshold, BLOCK_M, BLOCK_N)
    ok = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
    tl.store(keep_ptr + offs_m[:, None] * cols + offs_n[None, :], keep.to(tl.int8), mask=ok)


def philox_words(counters, key):
    """Host helper for tests: the four words int64 ``[4, n]`` for counters ``[4, n]`` int64 and key
    ``[2]`` int64 (uint32 values), through the jitted function."""
    import torch

    counters = counters.contiguous()
    n = counters.shape[1]
    out = torch.empty((4, n), dtype=torch.int64, device=counters.device)
    block = 1024
    _philox_words_kernel[(triton.cdiv(n, block),)](counters, key, out, n, BLOCK=block)
    return out


def philox_keep(key, dropout_p: float, rows: int, cols: int, c2: int = 0, c3: int = 0, *, block_m: int = 16,
                block_n: int = 32, per_element: bool = False):
    """Host helper for tests: keep mask bool ``[rows, cols]`` of counters ``(col // 8, row, c2, c3)``
    through :func:`philox_keep_tile` (or :func:`philox_keep_cols`)."""
    import torch

    keep = torch.empty((rows, cols), dtype=torch.int8, device=key.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _philox_keep_kernel[grid](key, keep, rows, cols, c2, c3, dropout_threshold(dropout_p), BLOCK_M=block_m,
                              BLOCK_N=block_n, PER_ELEMENT=per_element)
    return keep.bool()


def aot_variants(full: bool = False):
    """Ahead-of-time compile of the Philox test kernels (see ``_aot``): the words, and the keep
    tile with the threshold as an i32 and as the constant 1 Triton makes of the value 1."""
    from fastbert.backends.triton._aot import AotVariant, pointer

    words = AotVariant("philox words", _philox_words_kernel,
                       {"c_ptr": pointer("i64"), "key_ptr": pointer("i64"), "out_ptr": pointer("i64"), "n": 4099},
                       {"BLOCK": 1024}, num_warps=4)
    sig = {"key_ptr": pointer("i64"), "keep_ptr": pointer("i8"), "rows": 4099, "cols": 4099, "c2": 3, "c3": 5}
    thresholds = (6554, 1) if full else (6554,)
    return [words] + [AotVariant(f"philox keep tile threshold={t}", _philox_keep_kernel, sig | {"threshold": t},
                                 {"BLOCK_M": 64, "BLOCK_N": 64, "PER_ELEMENT": False}, num_warps=4)
                      for t in thresholds]
