"""The compiled CPU keep-mask generator (``fastbert._C_cpu``, csrc/cpu/dropout_cpu.cpp) draws the
shared dropout scheme v2 bit for bit: equal to the torch-op generator and to the readable spec
(``philox4x32`` + ``keep_from_words``) over shapes, seeds, p (rounding ties, the cap near 1),
column counts that are not multiples of 8 or of its 16-group lanes, varlen lengths, blocks at an
offset, the high row word, and thread counts; it writes every byte; its keep rate is 1 - p within
binomial error; and traced / fake calls keep the torch-op generator."""

import math

import pytest
import torch

from fastbert.backends import _philox
from fastbert.backends._philox import (MASK32, attention_keep_block, attention_keep_mask, dropout_threshold,
                                       keep_from_words, philox4x32, rows_keep_mask)

EXT = _philox.compiled_generator()
pytestmark = pytest.mark.skipif(isinstance(EXT, str), reason=str(EXT))

SEEDS = [torch.tensor([0x12345678, 0x9ABCDEF0]), torch.tensor([-1, -(2**62) + 12345]), torch.tensor([0, 2**40 + 7])]
# p values: 0 (keep all), 2**-17 (a tie: rounds to threshold 0), 3 * 2**-17 (a tie: rounds to 2),
# ordinary rates, p = 1 - 2**-18 (capped at threshold 65535).
PS = [0.0, 2.0**-17, 3 * 2.0**-17, 0.1, 0.5, 0.9, 1.0 - 2.0**-18]
# (batch, heads, seqlen_q, seqlen_k): one key, odd counts, 8 * 16 lanes +- 1 group, 97.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 13), (1, 2, 3, 8 * 16 + 1), (2, 1, 4, 8 * 17), (1, 1, 2, 8 * 16 - 3),
          (2, 2, 33, 97)]


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch):
    monkeypatch.setattr(_philox, "MASK_CACHE_BYTES", 0)  # every call generates


def _generate(compiled, fn, *args, **kw):
    old = _philox.USE_COMPILED
    _philox.USE_COMPILED = compiled
    try:
        return fn(*args, **kw)
    finally:
        _philox.USE_COMPILED = old


def _spec(seed, p, c0, c1, c2, c3, shape):
    """The readable spec on counters broadcast to ``shape`` (its last dim: 8-column groups)."""
    words = philox4x32(c0, c1, c2, c3, int(seed[0]) & MASK32, int(seed[1]) & MASK32)
    return keep_from_words([w.expand(shape) for w in words], p)


def _spec_attention(seed, p, seqs, heads, rows, groups):
    seqs = torch.as_tensor(seqs, dtype=torch.int64)
    ar = torch.arange
    return _spec(seed, p, ar(*groups).view(1, 1, 1, -1), ar(*rows).view(1, 1, -1, 1), ar(heads).view(1, -1, 1, 1),
                 seqs.view(-1, 1, 1, 1), (seqs.numel(), heads, rows[1] - rows[0], groups[1] - groups[0]))


def test_the_compiled_generator_runs_on_eager_cpu_calls():
    assert _philox._compiled_for(SEEDS[0], "cpu") is EXT
    assert _generate(False, _philox._compiled_for, SEEDS[0], "cpu") is None
    assert EXT.version() == __import__("fastbert").__version__


@pytest.mark.parametrize("p", PS)
def test_attention_mask_is_the_spec_and_the_torch_op_generator(p):
    for i, shape in enumerate(SHAPES):
        seed = SEEDS[i % len(SEEDS)]
        b, h, lq, lk = shape
        compiled = _generate(True, attention_keep_mask, seed, p, *shape)
        torch_ops = _generate(False, attention_keep_mask, seed, p, *shape)
        assert compiled.shape == shape and compiled.stride() == torch_ops.stride(), shape
        assert torch.equal(compiled, torch_ops), (p, shape)
        assert torch.equal(compiled, _spec_attention(seed, p, range(b), h, (0, lq), (0, -(-lk // 8)))[..., :lk])


@pytest.mark.parametrize("p", [0.1, 3 * 2.0**-17, 1.0 - 2.0**-18])
def test_rows_mask_is_the_spec_and_the_torch_op_generator(p):
    for i, (rows, hidden) in enumerate([(1, 1), (37, 100), (300, 768), (5, 8 * 16 + 1), (3, 8 * 33)]):
        seed = SEEDS[i % len(SEEDS)]
        compiled = _generate(True, rows_keep_mask, seed, p, rows, hidden)
        assert torch.equal(compiled, _generate(False, rows_keep_mask, seed, p, rows, hidden)), (rows, hidden)
        r = torch.arange(rows).view(-1, 1)
        groups = -(-hidden // 8)
        spec = _spec(seed, p, torch.arange(groups).view(1, -1), r & MASK32, r >> 32, torch.zeros(1, 1, dtype=torch.int64),
                     (rows, groups))
        assert torch.equal(compiled, spec[:, :hidden])


def test_rows_mask_past_two_to_the_32_rows_uses_the_high_row_word():
    """Rows 2**32 - 2 .. 2**32 + 1 (the module's row_start; no 2**32-row tensor needed)."""
    start, rows, groups = 2**32 - 2, 4, 19
    keep = torch.full((rows, 8 * groups), 7, dtype=torch.uint8)  # poison: every byte must be written
    EXT.rows_keep(keep.data_ptr(), 0x12345678, 0x9ABCDEF0, dropout_threshold(0.5), start, rows, groups, 2)
    r = torch.arange(start, start + rows).view(-1, 1)
    spec = _spec(SEEDS[0], 0.5, torch.arange(groups).view(1, -1), r & MASK32, r >> 32,
                 torch.zeros(1, 1, dtype=torch.int64), (rows, groups))
    assert torch.equal(keep, spec.to(torch.uint8))


@pytest.mark.parametrize("lengths", [[19, 0, 128, 64, 1, 100, 7, 33], [8, 9, 15, 16, 17, 1, 127, 0]])
def test_varlen_mask_is_the_torch_op_generator(lengths):
    """The valid region drawn, padded rows and 8-key groups past the length False, as the torch
    ops do it (group-granular: keys after the length inside its last group are drawn)."""
    args = (SEEDS[1], 0.1, len(lengths), 3, 128, 128)
    compiled = _generate(True, attention_keep_mask, *args, lengths=lengths)
    assert torch.equal(compiled, _generate(False, attention_keep_mask, *args, lengths=lengths))
    full = attention_keep_mask(*args)
    for b, n in enumerate(lengths):
        g = 8 * -(-n // 8)
        assert torch.equal(compiled[b, :, :n, :g], full[b, :, :n, :g]) and not compiled[b, :, n:].any()
        assert not compiled[b, :, :, g:].any(), b


@pytest.mark.parametrize("block", [(0, 64, 0, 77), (64, 128, 40, 131), (5, 6, 7, 9), (3, 3, 0, 8), (10, 20, 30, 30)])
def test_block_mask_is_that_block_of_the_full_mask(block):
    """A block at an offset (the local-attention window's), for sequences given by index."""
    qs, qe, ks, ke = block
    seqs = torch.tensor([3, 0, 5])
    full = attention_keep_mask(SEEDS[2], 0.3, 6, 2, 128, 131)
    compiled = _generate(True, attention_keep_block, SEEDS[2], 0.3, seqs, 2, qs, qe, ks, ke, "cpu")
    assert torch.equal(compiled, _generate(False, attention_keep_block, SEEDS[2], 0.3, seqs, 2, qs, qe, ks, ke, "cpu"))
    assert torch.equal(compiled, full[seqs][:, :, qs:qe, ks:ke])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_byte_written_whatever_the_thread_count(threads):
    """The module straight into poisoned memory (7 is no bool): every byte 0 / 1 and the spec's,
    with lines split over 1-3 threads (the line count not a multiple of the thread count)."""
    seqs, heads, rows, groups = [0, 1, 2], 5, 67, 21
    keep = torch.full((len(seqs), heads, rows, 8 * groups), 7, dtype=torch.uint8)
    EXT.attention_keep(keep.data_ptr(), 0x12345678, 0x9ABCDEF0, dropout_threshold(0.25), seqs, heads, 0, rows, 0,
                       groups, [], threads)
    assert torch.equal(keep, _spec_attention(SEEDS[0], 0.25, seqs, heads, (0, rows), (0, groups)).to(torch.uint8))
    lengths = [0, 67, 30]
    keep.fill_(7)
    EXT.attention_keep(keep.data_ptr(), 0x12345678, 0x9ABCDEF0, dropout_threshold(0.25), seqs, heads, 0, rows, 0,
                       groups, lengths, threads)
    assert set(keep.unique().tolist()) <= {0, 1}


def test_keep_rate_within_binomial_error():
    for p in (0.1, 0.5, 0.9):
        q = 1.0 - dropout_threshold(p) / 65536  # the exact keep probability of the rounded p
        for keep in (attention_keep_mask(SEEDS[0], p, 8, 12, 128, 128), rows_keep_mask(SEEDS[1], p, 1024, 768)):
            for sub in (keep, keep.reshape(-1, 8)[:, 3], keep.reshape(-1, 8)[:, 4]):
                n = sub.numel()
                assert abs(sub.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n), (p, n)


def test_bad_arguments_raise_naming_them():
    keep = torch.empty(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="lengths has 2 entries, expected one per sequence"):
        EXT.attention_keep(keep.data_ptr(), 0, 0, 1, [0], 1, 0, 1, 0, 1, [1, 2], 1)
    with pytest.raises(ValueError, match="threshold must be < 65536"):
        EXT.rows_keep(keep.data_ptr(), 0, 0, 65536, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="null pointer"):
        EXT.rows_keep(0, 0, 0, 1, 0, 1, 1, 1)


def test_traced_and_fake_calls_keep_the_torch_op_generator():
    """Under fake tensors or a dispatch mode the graph must see torch ops: no compiled call."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Count():
        assert _philox._compiled_for(SEEDS[0], "cpu") is None
        traced = attention_keep_mask(SEEDS[0], 0.1, 1, 2, 5, 13)
    assert torch.equal(traced, attention_keep_mask(SEEDS[0], 0.1, 1, 2, 5, 13))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(SEEDS[0])
        assert _philox._compiled_for(fake, "cpu") is None


# ---- the torch backend's varlen dropout: runs of equal-length sequences, no padding ----------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torch_varlen_dropout_runs_equal_the_padded_reference(dtype):
    """The torch backend computes varlen attention with dropout per run of equal-length sequences
    (``_varlen_dropout``): output and every gradient equal the reference backend's padded
    composite math (fp64: to rounding; bf16: the same fp32 math, so within a few bf16 ulp), with
    empty sequences, runs broken by an empty sequence, and NaN-poisoned outputs."""
    from fastbert.backends import get_backend
    from fastbert.backends.torch import _varlen_dropout

    lengths, heads, dim = [5, 5, 0, 5, 9, 9, 1, 0], 3, 16
    assert [r[1:] for r in _varlen_dropout._runs(torch.tensor([0] + lengths).cumsum(0))] == [
        [0, 2, 5], [3, 1, 5], [4, 2, 9], [6, 1, 1]]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(total, heads, dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
    kw = dict(attention_mask=None, attn_bias=None, cu_seqlens=cu, max_seqlen=max(lengths), dropout_p=0.3,
              seed=SEEDS[0], softmax_scale=dim**-0.5)
    results = {}
    for name in ("torch", "reference"):
        mod = get_backend(name).load("attention")
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(0) if name == "torch" else torch.full((2, heads, total), float("nan"))
        mod.attention_fwd(q, k, v, out, lse, **kw)
        grads = [torch.full_like(q, float("nan")) for _ in range(3)]
        mod.attention_bwd(do, q, k, v, out, lse, *grads, None, **kw)
        results[name] = [out, *grads]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for got, want, what in zip(results["torch"], results["reference"], ("out", "dq", "dk", "dv")):
        assert not got.isnan().any(), what
        torch.testing.assert_close(got, want, **tol, msg=what)
