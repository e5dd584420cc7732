"""The shared dropout scheme, version 2: Philox4x32-10 keep masks, one call per 8 columns.

Every backend (reference, torch, Triton, CUDA, cuda-host) derives dropout keep masks from this
spec bit for bit, so the same seed gives the same mask on every backend and layout:

- key = ``(k0, k1)``: the two uint32 words of the int64 ``[2]`` seed that ``fastbert.ops`` draws
  per call with a torch RNG op (so ``torch.manual_seed`` reproduces every mask);
- one Philox4x32-10 call per group of 8 consecutive columns, counter = the logical coordinates
  of the group: attention ``(key column // 8, query row, head, sequence)`` (positions within the
  sequence, so padded and varlen layouts draw the same mask); LayerNorm's add & norm
  ``(column // 8, row & 0xFFFFFFFF, row >> 32, 0)`` (row of the ``[rows, hidden]`` view);
- column ``j`` of the group reads the 16-bit value ``u = (word[(j % 8) // 2] >> (16 * (j % 2)))
  & 0xFFFF``: columns 0, 1 are the low and high halves of output word 0, columns 2, 3 of word 1,
  and so on (the little-endian uint16 view of the four words);
- the element is kept iff ``u >= t`` with ``t = dropout_threshold(p) = min(round(p * 65536),
  65535)`` (``round`` half to even, exact since ``p * 65536`` is exact in double precision), so
  ``p`` is rounded to the nearest multiple of 2**-16 and capped at ``1 - 2**-16``; any
  ``p < 2**-17`` keeps everything;
- kept elements are scaled by ``dropout_scale(p) = 65536 / (65536 - t) = 1 / (1 - p_eff)`` with
  the rounded ``p_eff = t / 65536``, the exact inverse keep probability: ``E[output] = input``
  (the difference from ``1 / (1 - p)`` is at most ``2**-17 / (1 - p)`` relative).

Version 1 drew one call per element and used 32 bits of word 0; version 2 draws 8x fewer calls
(FlashAttention-2 likewise serves several elements from one call; Dao 2023, sec. 3.1) at 16-bit
threshold resolution. Philox4x32-10: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; :func:`philox4x32` is the readable version, checked against Random123's known answers.

Two generators produce these bits. On the CPU, eagerly, the compiled one in ``fastbert._C_cpu``
(csrc/cpu/dropout_cpu.cpp: the rounds over 16 groups at a time, vectorised, on torch's thread
count) writes the mask directly; elsewhere — GPU tensors, a build without the module, anything
being traced (``torch.compile``, fake tensors, dispatch modes), or :data:`USE_COMPILED` set False
— the torch-op generator below runs. Tests hold the two bit-identical.

In the torch-op generator, uint32 arithmetic is emulated in int64 (a 32x32-bit product fits in 64 bits and int64 wraps
modulo 2**64, so both words of the product are exact). The mask generator :func:`_keep_into`
runs the rounds on the ``[.., columns / 8]`` counter grid in chunks that stay in cache, with
preallocated buffers updated in place, and expands the 16-bit halves to columns through an int16
view of the words (little-endian, as every platform torch runs on). On the CPU the masks of the
last calls are memoized by (seed, p, shape) up to :data:`MASK_CACHE_BYTES`, so a backward that
regenerates its forward's mask (same seed: the op saves it) finds it instead of recomputing it.
"""

from __future__ import annotations

import importlib
import sys
from collections import OrderedDict

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10
COLUMNS_PER_CALL = 8  # one Philox call serves 8 consecutive columns: 4 words x 2 halves
THRESHOLD_BITS = 16
_ONE = 1 << THRESHOLD_BITS  # 65536
_FLIP = 0x80008000  # XOR of the sign bit of both halves: uint16 order -> int16 order

assert sys.byteorder == "little", "the int16 view of the Philox words assumes little-endian"


def dropout_threshold(dropout_p: float) -> int:
    """16-bit threshold ``min(round(p * 65536), 65535)``: an element is kept iff its u16 >= this."""
    return min(int(round(dropout_p * float(_ONE))), _ONE - 1)


def dropout_scale(dropout_p: float) -> float:
    """Scale of kept elements, ``65536 / (65536 - t)`` = 1 / (1 - rounded p): unbiased for the mask."""
    return float(_ONE) / float(_ONE - dropout_threshold(dropout_p))


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors (or ints) holding uint32 values; returns the four output words.

    The readable version of the rounds (tests check the fast generator against it). Counters
    may be broadcastable.
    """
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def keep_from_words(words, dropout_p: float) -> torch.Tensor:
    """Spec of the expansion: keep mask ``[..., 8 * G]`` bool from the words ``[4, ..., G]`` (int64,
    uint32 values) of G consecutive 8-column groups (column j: word (j % 8) // 2, half j % 2)."""
    w = torch.stack(list(words), dim=-1)  # [..., G, 4]
    halves = torch.stack([w & 0xFFFF, w >> 16], dim=-1)  # [..., G, 4, 2]
    return (halves >= dropout_threshold(dropout_p)).flatten(-3)


def _round_keys(seed: torch.Tensor, device) -> torch.Tensor:
    """Round keys int64 ``[rounds, 2, 1]`` in the row order of :func:`_keep_into`'s buffers, with
    the final round's also flipping the sign bits of both halves (see there). No host sync."""
    k = (seed.to(device=device, dtype=torch.int64) & MASK32).view(1, 2)
    bump = torch.arange(PHILOX_ROUNDS, device=device, dtype=torch.int64).view(-1, 1)
    keys = (k + bump * torch.tensor([PHILOX_W0, PHILOX_W1], device=device)) & MASK32  # [R, (k0, k1)]
    # Even rounds combine rows (new c2, new c0), odd rounds (new c0, new c2): see _keep_into.
    keys[0::2] = keys[0::2].flip(-1)
    keys[-1] ^= _FLIP
    return keys.view(PHILOX_ROUNDS, 2, 1)


def _keep_into(keep, counters, keys, threshold: int, bufs) -> None:
    """Write the keep decisions of counters ``(c0, c1, c2, c3)`` (int64, broadcastable to shape
    ``S``) into ``keep`` (bool ``[*S, 8]``, contiguous). ``bufs``: four int64 buffers of >= 2 * n
    elements each, (n = prod(S)) reused across chunks.

    The rounds run on two-row buffers, ``a`` (the words to multiply) and ``b`` (the others), so
    each step is one op on 2n elements: with ``a = (c0, c2)``, ``b = (c1, c3)`` before round 0,
    ``prod = a * m``; ``a = (prod >> 32) ^ swap(b) ^ key, & MASK32``; ``b = prod``. The rows of
    ``a`` alternate between (c2, c0) and (c0, c2) (the multipliers and keys alternate with them),
    and ``b`` keeps the product's high word above bit 32, harmless: it is only XORed into ``a``,
    which is masked. After round 9: ``a = (c0, c2)``, ``b = (c1, c3)``.
    """
    shape = torch.broadcast_shapes(*(torch.Size(c.shape) for c in counters))
    n = shape.numel()
    a, b, prod = (x[: 2 * n].view(2, *shape) for x in bufs[:3])
    words = bufs[3][: 2 * n].view(torch.int32).view(*shape, 4)  # int32 [*S, 4]
    a[0].copy_(counters[0])
    a[1].copy_(counters[2])
    b[0].copy_(counters[1])
    b[1].copy_(counters[3])
    mults = (torch.tensor([PHILOX_M0, PHILOX_M1], device=a.device).view(2, *([1] * len(shape))),
             torch.tensor([PHILOX_M1, PHILOX_M0], device=a.device).view(2, *([1] * len(shape))))
    keys = keys.view(PHILOX_ROUNDS, 2, *([1] * len(shape)))
    for r in range(PHILOX_ROUNDS):
        torch.mul(a, mults[r % 2], out=prod)
        torch.bitwise_right_shift(prod, 32, out=a)
        a[0].bitwise_xor_(b[1])
        a[1].bitwise_xor_(b[0])
        a.bitwise_xor_(keys[r])
        if r + 1 < PHILOX_ROUNDS:  # the last round's high bits are dropped by the int32 cast below
            a.bitwise_and_(MASK32)
        a, b, prod = a, prod, b
    # Words as int32 (c0, c1, c2, c3) in the last dim, with both halves' sign bits flipped (a's
    # by the last round key), so the int16 view compares as uint16 against threshold - 32768.
    b.bitwise_xor_(_FLIP)
    words[..., 0].copy_(a[0])
    words[..., 1].copy_(b[0])
    words[..., 2].copy_(a[1])
    words[..., 3].copy_(b[1])
    torch.ge(words.view(torch.int16), threshold - (_ONE // 2), out=keep)


# Counters per chunk: 2 x 131072 int64 words per buffer keep the four buffers (8 MiB) near the core
# while each op spans torch's parallel grain (32768 elements) 8 times: few parallel regions.
_CHUNK = 131072


# Masks are pure functions of (seed, p, shape): backward regenerates exactly its forward's mask.
# CPU only (reading the seed there is free; on a GPU it would be a host sync). The budget holds a
# BERT-base training step's masks at 8x128 (~30 MB); older entries are evicted first.
MASK_CACHE_BYTES = 64 << 20
_MASK_CACHE: OrderedDict = OrderedDict()


def clear_mask_cache() -> None:
    """Forget every memoized CPU keep mask (benchmarks: each step generates its masks itself)."""
    _MASK_CACHE.clear()


def _memoized(kind: str, seed: torch.Tensor, dropout_p: float, shape: tuple, dev, build):
    """``build()`` or the mask it returned for the same key; never for CUDA seeds."""
    if seed.device.type != "cpu" or torch.device(dev).type != "cpu" or MASK_CACHE_BYTES <= 0:
        return build()
    key = (kind, int(seed[0]) & MASK32, int(seed[1]) & MASK32, dropout_threshold(dropout_p), shape)
    mask = _MASK_CACHE.get(key)
    if mask is None:
        mask = build()
        _MASK_CACHE[key] = mask
        total = sum(m.untyped_storage().nbytes() for m in _MASK_CACHE.values())
        while total > MASK_CACHE_BYTES and len(_MASK_CACHE) > 1:
            total -= _MASK_CACHE.popitem(last=False)[1].untyped_storage().nbytes()
    else:
        _MASK_CACHE.move_to_end(key)
    return mask


# The compiled CPU generator (fastbert._C_cpu); False = force the torch-op generator (benchmarks,
# tests). The module is loaded on first use: None = not tried yet, a str = why it is unavailable.
USE_COMPILED = True
_CPU_EXT = None


def compiled_generator():
    """The ``fastbert._C_cpu`` module, or a str saying why it is unavailable (not built, a version
    other than this fastbert's, or it failed to load)."""
    global _CPU_EXT
    if _CPU_EXT is None:
        try:
            ext = importlib.import_module("fastbert._C_cpu")
            version = sys.modules["fastbert"].__version__
            _CPU_EXT = ext if ext.version() == version else (
                f"fastbert._C_cpu was built for fastbert {ext.version()}, this is {version}: rebuild")
        except ImportError as exc:
            _CPU_EXT = f"fastbert._C_cpu is not available ({exc})"
    return _CPU_EXT


def _compiled_for(seed: torch.Tensor, dev):
    """The compiled generator when it may run this call: eager, CPU seed and mask, a plain tensor
    (no fake / functional tensor, no dispatch mode: their graphs must see torch ops); else None."""
    if not USE_COMPILED or seed.device.type != "cpu" or torch.device(dev).type != "cpu":
        return None
    if type(seed) is not torch.Tensor or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return None
    ext = compiled_generator()
    return None if isinstance(ext, str) else ext


def _key_words(seed: torch.Tensor) -> tuple[int, int]:
    k0, k1 = seed.tolist()
    return k0 & MASK32, k1 & MASK32


def _buffers(n: int, device):
    return [torch.empty(2 * n, dtype=torch.int64, device=device) for _ in range(4)]


def attention_keep_mask(seed: torch.Tensor, dropout_p: float, batch: int, num_heads: int,
                        seqlen_q: int, seqlen_k: int, device=None, lengths=None,
                        first_sequence: int = 0) -> torch.Tensor:
    """Keep mask ``[batch, num_heads, seqlen_q, seqlen_k]`` bool for attention dropout.

    Counter = (key column // 8, query row, head, sequence); positions are within the sequence,
    so padded and varlen layouts draw the same mask. A view of a ``[.., 8 * ceil(seqlen_k / 8)]``
    mask when seqlen_k is not a multiple of 8. ``lengths`` (varlen self-attention: a list of
    ``batch`` sequence lengths) draws only rows < length and 8-key groups that start below it;
    the rest is False (those rows and keys are padding there). ``first_sequence``: the logical
    index of the first sequence (a run of sequences drawn on its own: sequences ``first_sequence
    .. first_sequence + batch - 1``; without ``lengths``).
    """
    dev = seed.device if device is None else device
    if first_sequence:
        seqs = torch.arange(first_sequence, first_sequence + batch, device=dev)
        return attention_keep_block(seed, dropout_p, seqs, num_heads, 0, seqlen_q, 0, seqlen_k, dev)
    if lengths is not None:
        lengths = tuple(int(n) for n in lengths)
        if min(lengths, default=seqlen_q) < min(seqlen_q, seqlen_k):
            return _memoized(("attention", lengths), seed, dropout_p, (batch, num_heads, seqlen_q, seqlen_k), dev,
                             lambda: _varlen_keep_mask(seed, dropout_p, num_heads, seqlen_q, seqlen_k, lengths, dev))
    return _memoized("attention", seed, dropout_p, (batch, num_heads, seqlen_q, seqlen_k), dev,
                     lambda: _attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, dev))


def _varlen_keep_mask(seed, dropout_p, num_heads, seqlen_q, seqlen_k, lengths, dev):
    """The valid region of each sequence only: its (group, row, head, sequence) counters are
    listed flat (about a third of the padded grid at 50% fill), drawn in chunks and scattered."""
    batch, groups = len(lengths), -(-seqlen_k // COLUMNS_PER_CALL)
    ext = _compiled_for(seed, dev)
    if ext is not None:
        keep = torch.empty((batch, num_heads, seqlen_q, groups * COLUMNS_PER_CALL), dtype=torch.bool, device=dev)
        ext.attention_keep(keep.data_ptr(), *_key_words(seed), dropout_threshold(dropout_p), list(range(batch)),
                           num_heads, 0, seqlen_q, 0, groups, list(lengths), torch.get_num_threads())
        return keep[..., :seqlen_k]
    keep = torch.zeros((batch, num_heads, seqlen_q, groups, COLUMNS_PER_CALL), dtype=torch.bool, device=dev)
    n = torch.tensor(lengths, device=dev).view(-1, 1, 1, 1)
    ar = lambda k: torch.arange(k, device=dev, dtype=torch.int64)  # noqa: E731
    valid = (ar(seqlen_q).view(1, 1, -1, 1) < n) & (ar(groups).view(1, 1, 1, -1) * COLUMNS_PER_CALL < n)
    b, h, i, g = valid.expand(batch, num_heads, seqlen_q, groups).nonzero(as_tuple=True)
    total = b.numel()
    if total:
        keys = _round_keys(seed, dev)
        flat = torch.empty((total, COLUMNS_PER_CALL), dtype=torch.bool, device=dev)
        bufs = _buffers(min(_CHUNK, total), dev)
        for s in range(0, total, _CHUNK):
            e = min(s + _CHUNK, total)
            _keep_into(flat[s:e], (g[s:e], i[s:e], h[s:e], b[s:e]), keys, dropout_threshold(dropout_p), bufs)
        keep[b, h, i, g] = flat
    return keep.view(batch, num_heads, seqlen_q, -1)[..., :seqlen_k]


def _attention_keep_mask(seed, dropout_p, batch, num_heads, seqlen_q, seqlen_k, dev):
    groups = -(-seqlen_k // COLUMNS_PER_CALL)
    keep = torch.empty((batch * num_heads, seqlen_q, groups * COLUMNS_PER_CALL), dtype=torch.bool, device=dev)
    ext = _compiled_for(seed, dev)
    if ext is not None and keep.numel():
        ext.attention_keep(keep.data_ptr(), *_key_words(seed), dropout_threshold(dropout_p), list(range(batch)),
                           num_heads, 0, seqlen_q, 0, groups, [], torch.get_num_threads())
        return keep.view(batch, num_heads, seqlen_q, -1)[..., :seqlen_k]
    per_bh = seqlen_q * groups
    if per_bh and batch * num_heads:
        keys = _round_keys(seed, dev)
        ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
        col_group, row = ar(groups).view(1, 1, -1), ar(seqlen_q).view(1, -1, 1)
        step = max(1, _CHUNK // per_bh)  # (sequence, head) pairs per chunk
        bufs = _buffers(min(step, batch * num_heads) * per_bh, dev)
        for start in range(0, batch * num_heads, step):
            bh = ar(min(step, batch * num_heads - start)).add_(start).view(-1, 1, 1)
            chunk = keep[start:start + step].view(bh.shape[0], seqlen_q, groups, COLUMNS_PER_CALL)
            _keep_into(chunk, (col_group, row, bh % num_heads, bh // num_heads), keys,
                       dropout_threshold(dropout_p), bufs)
    return keep.view(batch, num_heads, seqlen_q, -1)[..., :seqlen_k]


def attention_keep_block(seed: torch.Tensor, dropout_p: float, seqs: torch.Tensor, num_heads: int, qs: int, qe: int,
                         ks: int, ke: int, device) -> torch.Tensor:
    """Rows ``[qs, qe)`` x keys ``[ks, ke)`` of the attention keep mask of the sequences ``seqs``
    (int64 ``[b]``, logical sequence indices): bool ``[b, num_heads, qe - qs, ke - ks]``,
    bit-identical to that block of :func:`attention_keep_mask`, at the block's cost (a local
    attention window draws only the blocks it reaches)."""
    g0, g1 = ks // COLUMNS_PER_CALL, -(-ke // COLUMNS_PER_CALL)
    shape = (seqs.numel(), num_heads, qe - qs, g1 - g0)
    keep = torch.empty(shape + (COLUMNS_PER_CALL,), dtype=torch.bool, device=device)
    ext = _compiled_for(seed, device) if seqs.device.type == "cpu" else None
    if ext is not None and keep.numel():
        ext.attention_keep(keep.data_ptr(), *_key_words(seed), dropout_threshold(dropout_p), seqs.tolist(),
                           num_heads, qs, qe - qs, g0, g1 - g0, [], torch.get_num_threads())
    elif keep.numel():
        ar = lambda a, b: torch.arange(a, b, device=device, dtype=torch.int64)  # noqa: E731
        counters = (ar(g0, g1).view(1, 1, 1, -1), ar(qs, qe).view(1, 1, -1, 1), ar(0, num_heads).view(1, -1, 1, 1),
                    seqs.view(-1, 1, 1, 1))
        _keep_into(keep, counters, _round_keys(seed, device), dropout_threshold(dropout_p),
                   _buffers(keep.numel() // COLUMNS_PER_CALL, device))
    off = ks - g0 * COLUMNS_PER_CALL
    return keep.flatten(-2)[..., off:off + ke - ks]


def rows_keep_mask(seed: torch.Tensor, dropout_p: float, num_rows: int, hidden: int,
                   device=None) -> torch.Tensor:
    """Keep mask ``[num_rows, hidden]`` bool for LayerNorm's fused dropout.

    Counter = (column // 8, row & 0xFFFFFFFF, row >> 32, 0). A view of a ``[num_rows, 8 *
    ceil(hidden / 8)]`` mask when hidden is not a multiple of 8.
    """
    dev = seed.device if device is None else device
    return _memoized("rows", seed, dropout_p, (num_rows, hidden), dev,
                     lambda: _rows_keep_mask(seed, dropout_p, num_rows, hidden, dev))


def _rows_keep_mask(seed, dropout_p, num_rows, hidden, dev):
    groups = -(-hidden // COLUMNS_PER_CALL)
    keep = torch.empty((num_rows, groups * COLUMNS_PER_CALL), dtype=torch.bool, device=dev)
    ext = _compiled_for(seed, dev)
    if ext is not None and keep.numel():
        ext.rows_keep(keep.data_ptr(), *_key_words(seed), dropout_threshold(dropout_p), 0, num_rows, groups,
                      torch.get_num_threads())
        return keep[:, :hidden]
    if num_rows and groups:
        keys = _round_keys(seed, dev)
        col_group = torch.arange(groups, device=dev, dtype=torch.int64).view(1, -1)
        zero = torch.zeros((1, 1), dtype=torch.int64, device=dev)
        step = max(1, _CHUNK // groups)
        bufs = _buffers(min(step, num_rows) * groups, dev)
        for start in range(0, num_rows, step):
            rows = torch.arange(start, min(start + step, num_rows), device=dev, dtype=torch.int64).view(-1, 1)
            chunk = keep[start:start + step].view(rows.shape[0], groups, COLUMNS_PER_CALL)
            _keep_into(chunk, (col_group, rows & MASK32, rows >> 32, zero), keys, dropout_threshold(dropout_p),
                       bufs)
    return keep[:, :hidden]
