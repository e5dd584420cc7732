"""Philox4x32-10 for Triton kernels, bit-identical to :mod:`fastbert.backends._philox`.

The shared dropout scheme (see fastbert/backends/_philox.py): key = the two uint32 seed words that
``fastbert.ops`` draws per call, counter = the element's logical coordinates (LayerNorm:
``(column, row & 0xFFFFFFFF, row >> 32, 0)``; attention: ``(key column, query row, head,
sequence)``), and an element is kept iff output word 0 is ``>= dropout_threshold(dropout_p)``
(computed on the host by :func:`fastbert.backends._philox.dropout_threshold` and passed to the
kernel as an integer argument).

Source: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (Philox4x32-10).
Each round multiplies two counter words by fixed 32-bit constants, uses the high halves
(``tl.umulhi``) XOR the other words and the round key, the low halves as the new odd words, and
bumps the key by the Weyl constants. All arithmetic is uint32 and wraps modulo 2**32.

Usage in a kernel::

    from fastbert.backends.triton._philox import philox_keep, philox_seed
    k0, k1 = philox_seed(seed_ptr)                        # seed_ptr: int64 [2]
    keep = philox_keep(cols, row_lo, row_hi, 0, k0, k1, threshold)
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastbert.backends._philox import (PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1,
                                       dropout_threshold)

__all__ = ["philox_word0", "philox_keep", "philox_seed", "dropout_threshold"]

# Module-level constexprs so the jitted functions see the same constants as the torch version.
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def philox_word0(c0, c1, c2, c3, k0, k1):
    """Output word 0 of Philox4x32-10 for counter ``(c0, c1, c2, c3)`` and key ``(k0, k1)``.

    Arguments are integer scalars or tensors (broadcastable; int32/int64 values are reduced to
    their low 32 bits); returns uint32 with their broadcast shape.
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
    return c0


@triton.jit
def philox_keep(c0, c1, c2, c3, k0, k1, threshold):
    """Dropout keep decision: ``philox_word0(...) >= threshold`` (bool, broadcast shape).

    ``threshold`` is ``dropout_threshold(dropout_p)`` from the host (0 keeps everything).
    """
    return philox_word0(c0, c1, c2, c3, k0, k1) >= tl.cast(threshold, tl.uint32)


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
                         out_ptr,  # int64 [n]: word 0
                         keep_ptr,  # int8 [n]: word 0 >= threshold
                         n, threshold, BLOCK: tl.constexpr):
    """Test kernel: evaluates :func:`philox_word0` and :func:`philox_keep` elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c0 = tl.load(c_ptr + offs, mask=valid, other=0)
    c1 = tl.load(c_ptr + n + offs, mask=valid, other=0)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=valid, other=0)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=valid, other=0)
    k0, k1 = philox_seed(key_ptr)
    word = philox_word0(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + offs, word.to(tl.int64), mask=valid)
    keep = philox_keep(c0, c1, c2, c3, k0, k1, threshold)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=valid)


def philox_words(counters, key, dropout_p: float = 0.0):
    """Host helper for tests: word 0 (int64) and keep mask (bool) for counters ``[4, n]`` int64
    and key ``[2]`` int64 (uint32 values), through the jitted functions."""
    import torch

    counters = counters.contiguous()
    n = counters.shape[1]
    out = torch.empty(n, dtype=torch.int64, device=counters.device)
    keep = torch.empty(n, dtype=torch.int8, device=counters.device)
    block = 1024
    _philox_words_kernel[(triton.cdiv(n, block),)](counters, key, out, keep, n,
                                                   dropout_threshold(dropout_p), BLOCK=block)
    return out, keep.bool()


def aot_variants(full: bool = False):
    """Ahead-of-time compile of the Philox test kernel (see ``_aot``): the threshold as an i32, as
    the constant 1 Triton makes of the value 1, and as an i64 (thresholds >= 2**31)."""
    from fastbert.backends.triton._aot import AotVariant, pointer

    sig = {"c_ptr": pointer("i64"), "key_ptr": pointer("i64"), "out_ptr": pointer("i64"),
           "keep_ptr": pointer("i8"), "n": 4099}
    thresholds = (17, 1, 2**31 + 5) if full else (2**31 + 5,)
    return [AotVariant(f"philox threshold={t}", _philox_words_kernel, sig | {"threshold": t}, {"BLOCK": 1024},
                       num_warps=4) for t in thresholds]
