"""The shared dropout scheme, version 2 (fastbert/backends/_philox.py): the fast torch generator
equals the readable spec, every CPU-available backend draws the same masks in the padded and the
varlen layouts, the keep rate is 1 - p within binomial error, and the rounding of p is the
documented one (p = 0, p not a multiple of 2**-16, ties, p close to 1)."""

import math

import pytest
import torch

from fastbert import ops
from fastbert.backends import _philox, get_backend
from fastbert.backends._philox import (MASK32, attention_keep_mask, dropout_scale, dropout_threshold,
                                       keep_from_words, philox4x32, rows_keep_mask)

SEED = torch.tensor([0x12345678, 0x9ABCDEF0], dtype=torch.int64)
CPU_BACKENDS = ("reference", "torch", "triton", "cuda-host")


def _spec_attention(seed, p, batch, heads, lq, lk):
    """The spec written out: one call per (8-key group, query row, head, sequence)."""
    ar = torch.arange
    groups = -(-lk // 8)
    words = philox4x32(ar(groups).view(1, 1, 1, -1), ar(lq).view(1, 1, -1, 1), ar(heads).view(1, -1, 1, 1),
                       ar(batch).view(-1, 1, 1, 1), seed[0].item(), seed[1].item())
    return keep_from_words([w.expand(batch, heads, lq, groups) for w in words], p)[..., :lk]


def _spec_rows(seed, p, rows, hidden):
    groups = -(-hidden // 8)
    r = torch.arange(rows).view(-1, 1)
    words = philox4x32(torch.arange(groups).view(1, -1), r & MASK32, r >> 32, torch.zeros(1, 1, dtype=torch.int64),
                       seed[0].item(), seed[1].item())
    return keep_from_words([w.expand(rows, groups) for w in words], p)[:, :hidden]


@pytest.mark.parametrize("chunk", [_philox._CHUNK, 100])  # 100: many chunks, some ending mid-sequence
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_fast_generator_is_the_spec(monkeypatch, chunk, p):
    monkeypatch.setattr(_philox, "_CHUNK", chunk)
    monkeypatch.setattr(_philox, "MASK_CACHE_BYTES", 0)  # generate every mask here
    for shape in [(2, 3, 5, 13), (1, 1, 1, 1), (3, 2, 7, 64), (2, 2, 33, 97)]:
        assert torch.equal(attention_keep_mask(SEED, p, *shape), _spec_attention(SEED, p, *shape)), shape
    for rows, hidden in [(37, 100), (1, 7), (300, 768)]:
        assert torch.equal(rows_keep_mask(SEED, p, rows, hidden), _spec_rows(SEED, p, rows, hidden))


def test_varlen_mask_draws_only_the_valid_region(monkeypatch):
    """With sequence lengths the mask equals the full one on each sequence's rows and keys, and
    padded rows are False (they are never drawn)."""
    monkeypatch.setattr(_philox, "MASK_CACHE_BYTES", 0)
    lengths = [19, 0, 128, 64, 1, 100, 7, 33]
    full = attention_keep_mask(SEED, 0.1, 8, 3, 128, 128)
    part = attention_keep_mask(SEED, 0.1, 8, 3, 128, 128, lengths=lengths)
    for b, n in enumerate(lengths):
        assert torch.equal(full[b, :, :n, :n], part[b, :, :n, :n]), b
        assert not part[b, :, n:].any()


def test_mask_cache_returns_the_same_masks_within_its_budget(monkeypatch):
    """Memoized masks equal freshly generated ones; the cache never holds more than its budget
    (beyond the newest entry) and evicts the oldest first."""
    monkeypatch.setattr(_philox, "_MASK_CACHE", type(_philox._MASK_CACHE)())
    monkeypatch.setattr(_philox, "MASK_CACHE_BYTES", 3 * 64 * 96)
    seeds = [torch.tensor([s, 7]) for s in range(5)]
    first = [rows_keep_mask(s, 0.2, 64, 96) for s in seeds]
    assert len(_philox._MASK_CACHE) == 3  # 64 x 96 bools each: the two oldest evicted
    assert rows_keep_mask(seeds[-1], 0.2, 64, 96) is first[-1]  # a hit
    again = [rows_keep_mask(s, 0.2, 64, 96) for s in seeds]
    monkeypatch.setattr(_philox, "MASK_CACHE_BYTES", 0)
    for s, a, b in zip(seeds, first, again):
        fresh = rows_keep_mask(s, 0.2, 64, 96)
        assert torch.equal(a, fresh) and torch.equal(b, fresh)
    assert not torch.equal(first[0], first[1])


def test_rows_counter_uses_the_high_row_word():
    """Row r and r + 2**32 differ only in counter word 2 (the generator takes int64 row numbers)."""
    r = torch.tensor([[5], [5 + 2**32]])
    words = philox4x32(torch.arange(4).view(1, -1), r & MASK32, r >> 32, torch.zeros(1, 1, dtype=torch.int64),
                       SEED[0].item(), SEED[1].item())
    keep = keep_from_words([w.expand(2, 4) for w in words], 0.5)
    assert not torch.equal(keep[0], keep[1])
    assert torch.equal(keep[:1], rows_keep_mask(SEED, 0.5, 6, 32)[5:6])


def test_threshold_rounding():
    """t = min(round(p * 65536), 65535), ties to even; scale = 65536 / (65536 - t)."""
    assert dropout_threshold(0.0) == 0 and dropout_scale(0.0) == 1.0
    assert dropout_threshold(0.1) == 6554  # 6553.6: p is not a multiple of 2**-16
    assert dropout_threshold(0.3) == 19661  # 19660.8
    assert dropout_threshold(2.0**-17) == 0  # tie 0.5 -> 0: keeps everything
    assert dropout_threshold(3 * 2.0**-17) == 2  # tie 1.5 -> 2
    assert dropout_threshold(5 * 2.0**-17) == 2  # tie 2.5 -> 2
    assert dropout_threshold(1.0 - 2.0**-16) == 65535
    assert dropout_threshold(1.0 - 2.0**-17) == 65535  # 65535.5 rounds to 65536: capped
    assert dropout_threshold(math.nextafter(1.0, 0.0)) == 65535
    assert dropout_scale(0.1) == 65536 / (65536 - 6554)
    assert dropout_scale(1.0 - 2.0**-17) == 65536.0  # finite however close p is to 1


def test_keep_rate_within_binomial_error():
    rows, hidden = 1024, 768
    for p in (0.1, 0.5, 0.9, 0.3):
        keep = rows_keep_mask(SEED, p, rows, hidden)
        q = 1.0 - dropout_threshold(p) / 65536  # the exact keep probability of the rounded p
        for sub in (keep, keep.view(rows, -1, 8)[..., 3], keep.view(rows, -1, 8)[..., 4]):
            n = sub.numel()
            assert abs(sub.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n), (p, n)
        pairs = (keep[:, 0::2] & keep[:, 1::2]).float().mean().item()  # the two halves of one word
        assert abs(pairs - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (keep.numel() / 2)), p
    keep = attention_keep_mask(SEED, 0.1, 8, 12, 128, 128)
    q = 1.0 - dropout_threshold(0.1) / 65536
    assert abs(keep.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / keep.numel())


def test_p_close_to_one_keeps_u16_max_only():
    """p >= 1 - 2**-17 is capped at threshold 65535: only u16 == 0xFFFF is kept (rate 2**-16),
    scaled by 65536, so E[output] = input still holds."""
    rows, hidden = 4096, 512
    keep = rows_keep_mask(SEED, 1.0 - 2.0**-18, rows, hidden)
    expected = rows * hidden / 65536
    assert abs(keep.sum().item() - expected) < 5 * math.sqrt(expected)
    assert torch.equal(keep, _spec_rows(SEED, 1.0 - 2.0**-18, rows, hidden))
    x = torch.rand(rows, hidden) + 1.0
    w, b = torch.ones(hidden), torch.zeros(hidden)
    y = torch.empty_like(x)
    h = torch.empty_like(x)
    stats = torch.empty(rows), torch.empty(rows)
    get_backend("torch").load("layer_norm").layer_norm_fwd(x, w, b, None, None, y, *stats, h, eps=1e-5,
                                                           dropout_p=1.0 - 2.0**-18, seed=SEED)
    assert torch.equal(h[keep], x[keep] * 65536.0) and torch.equal(h[~keep], torch.zeros_like(x[~keep]))


def _loaded(backend, op):
    spec = get_backend(backend)
    mod = spec.load(op)
    if isinstance(mod, str) or spec.unavailable_reason(op) is not None:
        pytest.skip(f"{backend}: {spec.unavailable_reason(op) or mod}")
    return mod


# p = 0.3 is not a multiple of 2**-16; 3 * 2**-17 is a rounding tie. Triton takes its threshold
# from the same Python dropout_threshold as the reference (tested above), so the large tie case
# runs where the rounding has its own code (C++: cuda-host) and on the torch-level backends.
@pytest.mark.parametrize("backend, p", [(b, 0.3) for b in CPU_BACKENDS]
                         + [(b, 3 * 2.0**-17) for b in ("reference", "torch", "cuda-host")])
def test_layer_norm_masks_identical_across_backends(backend, p):
    """h = dropout(x) read back from every backend equals the spec's mask and scale, bit for bit.
    p = 3 * 2**-17 rounds (to even) to threshold 2: u16 == 1 is dropped, u16 == 2 kept."""
    mod = _loaded(backend, "layer_norm")
    rows, hidden = (1024, 520) if p < 0.01 else (37, 300)  # 532k elements: ~8 u16 values equal 1
    gen = torch.Generator().manual_seed(11)  # not the global RNG: earlier tests must not change the inputs
    x = torch.rand(rows, hidden, generator=gen) + 1.0  # no zeros: h == 0 exactly where dropped
    y, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    mean, rstd = torch.full((rows,), float("nan")), torch.full((rows,), float("nan"))
    mod.layer_norm_fwd(x, None, None, None, None, y, mean, rstd, h, eps=1e-5, dropout_p=p, seed=SEED)
    keep = _spec_rows(SEED, p, rows, hidden)
    if p < 0.01:  # the tie matters here: threshold 1 would keep more
        assert not torch.equal(keep, _spec_rows(SEED, 2.0**-16, rows, hidden))
    assert torch.equal(h != 0, keep)
    assert torch.equal(h[keep], x[keep] * torch.tensor(dropout_scale(p), dtype=torch.float32))
    dx = torch.full_like(x, float("nan"))
    dy = torch.rand(rows, hidden, generator=gen) + 1.0
    mod.layer_norm_bwd(dy, h, None, mean, rstd, dx, None, None, None, None, dropout_p=p, seed=SEED)
    # Dropped elements get exact zeros; kept ones dh * scale (not "dx != 0": LayerNorm's dh can
    # cancel to an exact 0 at a kept element, about one seed in eight at 532k elements).
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))
    hd = h.double().requires_grad_()
    (dh,) = torch.autograd.grad(torch.nn.functional.layer_norm(hd, (hidden,), eps=1e-5), hd, dy.double())
    want = dh * dropout_scale(p)
    torch.testing.assert_close(dx[keep].double(), want[keep], rtol=1e-4, atol=1e-4)


def _attention_keep(backend, p, lengths, varlen, heads=2):
    """The keep mask read off the forward of ``backend``: uniform scores (softmax_scale = 0) and
    one-hot values (v[key j] = e_j), so out[b, i, h, j] = keep[b, h, i, j] * scale / len_b."""
    mod = _loaded(backend, "attention")
    batch, lmax = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, lmax, heads, lmax, generator=gen)
    eye = torch.eye(lmax).view(1, lmax, 1, lmax).expand(batch, lmax, heads, lmax)
    mask = torch.arange(lmax)[None, :] < torch.tensor(lengths)[:, None]
    kw = dict(attn_bias=None, dropout_p=p, seed=SEED, softmax_scale=0.0)
    if varlen:
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        qv, vv = q[mask].contiguous(), eye[mask].contiguous()
        out = torch.full_like(qv, float("nan"))
        lse = torch.full((2, heads, qv.shape[0]), float("nan"))  # the (m, log l) planes
        mod.attention_fwd(qv, qv, vv, out, lse, attention_mask=None, cu_seqlens=cu, max_seqlen=lmax, **kw)
        padded = torch.zeros(batch, lmax, heads, lmax)
        padded[mask] = out
        out = padded
    else:
        out = torch.full_like(q, float("nan"))
        lse = torch.full((2, batch, heads, lmax), float("nan"))
        mod.attention_fwd(q, q, eye.contiguous(), out, lse, attention_mask=mask, cu_seqlens=None, max_seqlen=lmax,
                          **kw)
    out = out.permute(0, 2, 1, 3)  # [batch, heads, lq, lk]
    scale = torch.tensor(dropout_scale(p), dtype=torch.float32)
    for b, n in enumerate(lengths):  # kept entries are scale / len_b
        got = out[b, :, :n, :n]
        torch.testing.assert_close(got[got != 0], (scale / n).expand_as(got[got != 0]), rtol=2e-6, atol=0)
    return out != 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_masks_identical_across_backends_and_layouts(backend):
    """Padded and varlen layouts of every CPU backend give the spec's mask on the valid
    (query, key) block of each sequence; keys past a sequence's length are never kept."""
    p, lengths, heads = 0.3, [19, 7, 24], 2
    spec = _spec_attention(SEED, p, len(lengths), heads, max(lengths), max(lengths))
    for varlen in (False, True):
        keep = _attention_keep(backend, p, lengths, varlen, heads)
        for b, n in enumerate(lengths):
            assert torch.equal(keep[b, :, :n, :n], spec[b, :, :n, :n]), (backend, varlen, b)
            assert not keep[b, :, :n, n:].any()


def test_same_torch_seed_same_masks():
    """The seed comes from torch's RNG: torch.manual_seed reproduces a LayerNorm dropout exactly."""
    x = torch.randn(64, 96)

    def run(seed):
        torch.manual_seed(seed)
        return ops.layer_norm(x, dropout_p=0.25, backend="torch")

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
