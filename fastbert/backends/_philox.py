"""Philox4x32-10 counter-based RNG in plain torch integer ops, shared by the torch-level backends.

Every backend (reference, torch, Triton, CUDA) derives dropout keep masks from the same scheme so
that the same seed gives the same mask everywhere:

- key   = (seed[0], seed[1]): two uint32 words drawn by ``fastbert.ops`` per call;
- counter = (c0, c1, c2, c3): the logical coordinates of the element
  (attention: ``(key column, query row, head, sequence)``; LayerNorm: ``(column, row low 32 bits,
  row high 32 bits, 0)``);
- the first output word ``r`` keeps the element iff ``r >= dropout_threshold(dropout_p)``.

Source: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (Philox4x32-10).
uint32 arithmetic is emulated in int64: a 32x32-bit product fits in 64 bits, and int64 wraps modulo
2**64, so the high and low words of the product are exact.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10


def dropout_threshold(dropout_p: float) -> int:
    """uint32 threshold: an element is kept iff its random word is >= this value."""
    return min(int(round(dropout_p * 4294967296.0)), MASK32)


def _xor_into(a, b):
    """``a ^ b``, in place on ``a`` (always a fresh temporary here) when it has the result's shape."""
    if isinstance(b, int) or a.shape == torch.broadcast_shapes(a.shape, b.shape):
        return a.bitwise_xor_(b)
    return a ^ b


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words.

    Counters may be broadcastable rather than full-size (the first rounds then run on small
    tensors); temporaries are updated in place, never the inputs.
    """
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0 = (p0 >> 32).bitwise_and_(MASK32)
        hi1 = (p1 >> 32).bitwise_and_(MASK32)
        lo0 = p0.bitwise_and_(MASK32)
        lo1 = p1.bitwise_and_(MASK32)
        c0, c1, c2, c3 = _xor_into(_xor_into(hi1, c1), k0), lo1, _xor_into(_xor_into(hi0, c3), k1), lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_word0(c0, c1, c2, c3, seed: torch.Tensor) -> torch.Tensor:
    """First Philox output word for broadcastable int64 counter tensors and a seed tensor [2] int64.

    The seed stays a tensor (no host sync on GPU): its words broadcast like the counters.
    """
    return philox4x32(c0, c1, c2, c3, seed[0] & MASK32, seed[1] & MASK32)[0]


def attention_keep_mask(seed: torch.Tensor, dropout_p: float, batch: int, num_heads: int,
                        seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Keep mask ``[batch, num_heads, seqlen_q, seqlen_k]`` bool for attention dropout.

    Counter = (key column j, query row i, head h, sequence b); positions are within the sequence,
    so padded and varlen layouts draw the same mask.
    """
    dev = seed.device if device is None else device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    c0 = ar(seqlen_k).view(1, 1, 1, -1)
    c1 = ar(seqlen_q).view(1, 1, -1, 1)
    c2 = ar(num_heads).view(1, -1, 1, 1)
    c3 = ar(batch).view(-1, 1, 1, 1)
    # Counters stay broadcast, not expanded: the first rounds then run on small tensors (exact).
    word = philox_word0(c0, c1, c2, c3, seed.to(dev))
    return (word >= dropout_threshold(dropout_p)).expand(batch, num_heads, seqlen_q, seqlen_k)


def rows_keep_mask(seed: torch.Tensor, dropout_p: float, num_rows: int, hidden: int,
                   device=None) -> torch.Tensor:
    """Keep mask ``[num_rows, hidden]`` bool for LayerNorm's fused dropout.

    Counter = (column, row & 0xFFFFFFFF, row >> 32, 0).
    """
    dev = seed.device if device is None else device
    rows = torch.arange(num_rows, device=dev, dtype=torch.int64).view(-1, 1)
    cols = torch.arange(hidden, device=dev, dtype=torch.int64).view(1, -1)
    zero = torch.zeros((1, 1), dtype=torch.int64, device=dev)
    word = philox_word0(cols, rows & MASK32, rows >> 32, zero, seed.to(dev))  # broadcast, exact
    return (word >= dropout_threshold(dropout_p)).expand(num_rows, hidden)
