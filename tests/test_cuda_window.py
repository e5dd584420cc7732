"""Sliding-window attention in the CUDA kernels (csrc/attention_fwd.cu, csrc/attention_bwd.cu),
run on the CPU through ``cuda-host``, against a dense band-mask reference.

Contract (issue 17): ``window=(left, right)``: query i sees key j iff ``i - left <= j <= i + right``,
positions within the sequence (padded index, or offset from the cu_seqlens start; top-left aligned
also when seqlen_q != seqlen_k), on top of the usual masks; a row with no key in its window is
empty (out 0, lse (+inf, 0), zero gradients). The reference is the reference backend's math
(``attention_math`` / ``attention_math_bwd``) with the window as a ``-inf`` band added to the
bias, which is how that math excludes a key; varlen is padded there, with the padding as the mask.

The kernels are called through the backend entry points directly (outputs NaN-poisoned), so these
tests run before ``fastbert.ops`` takes ``window=``. Besides parity: tiles outside the window are
never read (NaN there leaves the result clean), an unbounded window is bit-identical to none, and
the binding rejects a bad window by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from _cases import require_backend
from _cases_attention import assert_host_binding_rejects
from _tolerance import assert_close_to_ref, attention_floor_eps

from fastbert.backends import get_backend
from fastbert.backends.reference import attention_math, attention_math_bwd

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SEED = (0x2468ACE0, 0x13579BDF)


@dataclass(frozen=True)
class WindowCase:
    dtype: torch.dtype
    head_dim: int
    window: tuple | None  # (left, right), or None: no window
    seqlen_q: int = 17  # varlen: ignored (lengths below)
    seqlen_k: int = 17
    batch: int = 2
    num_heads: int = 2
    lengths: tuple = ()  # varlen sequence lengths (0 allowed) when non-empty
    mask: bool = False  # attention_mask (random padding keys, key 0 kept)
    bias: str | None = None  # "11QK" | "B11K" | "BHQK", with its gradient
    dropout_p: float = 0.0

    @property
    def varlen(self) -> bool:
        return bool(self.lengths)

    def __str__(self) -> str:
        shape = (f"varlen{'_'.join(map(str, self.lengths))}" if self.varlen
                 else f"{self.batch}x{self.seqlen_q}x{self.seqlen_k}")
        feats = [f for f, on in (("mask", self.mask), (f"bias{self.bias}", self.bias),
                                 (f"p{self.dropout_p}", self.dropout_p > 0)) if on]
        win = "global" if self.window is None else f"w{self.window[0]}_{self.window[1]}"
        return f"{str(self.dtype)[6:]}-d{self.head_dim}-h{self.num_heads}-{shape}-{win}-{'+'.join(feats) or 'plain'}"


# Each axis value at least once: fp32/fp16/bf16; every head_dim bucket; padded (seqlen_q <, =, >
# seqlen_k) and varlen with an empty sequence; window (0, 0), one-sided, asymmetric, larger than the
# sequence; sequences shorter than a tile; rows with no key (seqlen_q > seqlen_k + left); key tiles
# skipped before and after the window (seqlen >> window); mask, bias (+ its gradient), dropout.
CASES = (
    WindowCase(F16, 64, (16, 16), 200, 200, batch=1, bias="BHQK"),
    WindowCase(BF16, 40, (0, 0), 130, 130, batch=2, num_heads=1, mask=True, dropout_p=0.1),
    WindowCase(F32, 32, (5, 20), 40, 150, bias="BHQK"),
    WindowCase(F16, 128, (3, 2), 150, 40, num_heads=1, bias="B11K"),
    WindowCase(F32, 64, (16, 4), lengths=(0, 5, 130, 70), num_heads=1, dropout_p=0.2),
    WindowCase(F16, 32, (0, 0), lengths=(1, 33, 200)),
    WindowCase(BF16, 256, (100, 100), 17, 17, batch=1, bias="11QK"),
    WindowCase(F16, 80, (0, 50), 97, 97, mask=True, bias="B11K", dropout_p=0.15),
    WindowCase(F32, 8, (64, 0), lengths=(129, 3)),
    WindowCase(F16, 16, (0, 0), 5, 3, batch=1, num_heads=1),
    WindowCase(BF16, 64, (0, 0), 1, 1, batch=1, num_heads=1, dropout_p=0.3),
    WindowCase(F32, 256, (7, 70), 100, 100, batch=1, num_heads=1, mask=True),
)


def _inputs(case: WindowCase) -> dict:
    """fp64 master copies of the case's inputs."""
    g = torch.Generator().manual_seed(case.head_dim * 7919 + case.seqlen_q * 31 + case.seqlen_k + sum(case.lengths))
    h, d = case.num_heads, case.head_dim
    t: dict = {}
    if case.varlen:
        total = sum(case.lengths)
        t["cu_seqlens"] = torch.tensor([0] + torch.tensor(case.lengths).cumsum(0).tolist(), dtype=torch.int32)
        for n in ("q", "k", "v", "dout"):
            t[n] = torch.randn(total, h, d, generator=g, dtype=torch.float64)
        return t
    b, lq, lk = case.batch, case.seqlen_q, case.seqlen_k
    t["q"], t["dout"] = (torch.randn(b, lq, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    t["k"], t["v"] = (torch.randn(b, lk, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    if case.mask:
        mask = torch.rand(b, lk, generator=g) > 0.3
        mask[:, 0] = True
        t["attention_mask"] = mask
    if case.bias is not None:
        shape = {"11QK": (1, 1, lq, lk), "B11K": (b, 1, 1, lk), "BHQK": (b, h, lq, lk)}[case.bias]
        t["attn_bias"] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t


def _band(lq: int, lk: int, window: tuple) -> torch.Tensor:
    """bool [lq, lk]: key j inside query i's window."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return (j >= i - window[0]) & (j <= i + window[1])


def _pad(x: torch.Tensor, lengths: tuple) -> torch.Tensor:
    """Packed [total, ...] -> [batch, max_len, ...], zero-padded."""
    out = x.new_zeros((len(lengths), max(lengths)) + tuple(x.shape[1:]))
    for b, (s, n) in enumerate(zip([0] + torch.tensor(lengths).cumsum(0).tolist(), lengths)):
        out[b, :n] = x[s:s + n]
    return out


def _unpad(x: torch.Tensor, lengths: tuple) -> torch.Tensor:
    """[batch, max_len, ...] -> packed [total, ...]."""
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def _reference(case: WindowCase, inputs: dict, dtype) -> dict:
    """out, lse (logsumexp, +inf on empty rows), dq, dk, dv (and dbias) of the dense band-mask
    reference, computing in ``dtype`` (fp64: the arbiter; the case's dtype: PyTorch's own error)."""
    q, k, v, dout = (inputs[n].to(dtype) for n in ("q", "k", "v", "dout"))
    kw = dict(dropout_p=case.dropout_p, seed=torch.tensor(SEED, dtype=torch.int64),
              softmax_scale=1.0 / math.sqrt(case.head_dim))
    if case.varlen:
        lengths, n = case.lengths, max(case.lengths)
        q, k, v, dout = (_pad(t, lengths) for t in (q, k, v, dout))
        kw["attention_mask"] = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
        kw["lengths"] = list(lengths)
        lq = lk = n
    else:
        kw["attention_mask"] = inputs.get("attention_mask")
        lq, lk = case.seqlen_q, case.seqlen_k
    band = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~_band(lq, lk, case.window), float("-inf"))
    bias = inputs.get("attn_bias")
    bias = band[None, None] if bias is None else bias + band
    kw["attn_bias"] = bias.to(dtype) if dtype != torch.float64 else bias
    out, lse = attention_math(q, k, v, **kw)
    dq, dk, dv, dscores = attention_math_bwd(dout, q, k, v, **kw)
    res = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if case.varlen:
        res = {n: _unpad(t, case.lengths) for n, t in res.items() if n != "lse"}
        res["lse"] = torch.cat([lse[b, :, :m] for b, m in enumerate(case.lengths)], dim=1)  # [H, total]
    elif "attn_bias" in inputs:
        res["dbias"] = dscores.float()
    return res


def _visible(case: WindowCase, inputs: dict) -> list:
    """Per sequence, bool [seqlen_q, seqlen_k]: query i attends key j (window and mask)."""
    if case.varlen:
        return [_band(n, n, case.window) for n in case.lengths]
    out = []
    for b in range(case.batch):
        vis = _band(case.seqlen_q, case.seqlen_k, case.window)
        if case.mask:
            vis = vis & inputs["attention_mask"][b][None, :]
        out.append(vis)
    return out


def _kernel(case: WindowCase, inputs: dict) -> dict:
    """out, lse (m + log l), dq, dk, dv (and dbias) from the cuda-host entry points, every output
    poisoned with NaN first; also the raw lse planes."""
    mod = get_backend("cuda-host").load("attention")
    q, k, v, dout = (inputs[n].to(case.dtype) for n in ("q", "k", "v", "dout"))
    h = case.num_heads
    kw = dict(attention_mask=inputs.get("attention_mask"), attn_bias=None, cu_seqlens=None, max_seqlen=0,
              dropout_p=case.dropout_p, seed=torch.tensor(SEED, dtype=torch.int64) if case.dropout_p else None,
              softmax_scale=1.0 / math.sqrt(case.head_dim), window=case.window)
    if case.varlen:
        kw["cu_seqlens"], kw["max_seqlen"] = inputs["cu_seqlens"], max(case.lengths)
        lse = torch.full((2, h, q.shape[0]), float("nan"))
    else:
        lse = torch.full((2, case.batch, h, case.seqlen_q), float("nan"))
    if "attn_bias" in inputs:
        kw["attn_bias"] = inputs["attn_bias"].to(case.dtype).expand(case.batch, h, case.seqlen_q, case.seqlen_k)
    out = torch.full_like(q, float("nan"))
    mod.attention_fwd(q, k, v, out, lse, **kw)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    dbias = (torch.full((case.batch, h, case.seqlen_q, case.seqlen_k), float("nan"))
             if "attn_bias" in inputs else None)
    mod.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, **kw)
    res = {"out": out, "lse": lse[0] + lse[1], "dq": dq, "dk": dk, "dv": dv, "lse_planes": lse}
    if dbias is not None:
        res["dbias"] = dbias
    return res


def _rows(x: torch.Tensor, case: WindowCase, b: int) -> torch.Tensor:
    """Sequence b's rows of a [batch, seqlen, heads, d] / [total, heads, d] tensor: [seqlen, heads, d]."""
    if case.varlen:
        start = sum(case.lengths[:b])
        return x[start:start + case.lengths[b]]
    return x[b]


def check_window_case(case: WindowCase) -> None:
    inputs = _inputs(case)
    got = _kernel(case, inputs)
    hi = _reference(case, inputs, torch.float64)
    lo = _reference(case, inputs, case.dtype)
    # The floors of tests/test_cuda_attention.py; the kernels' raw dbias is the fp32 gradient of a
    # half-precision computation there (what that file calls an fp32 bias).
    for name in ("out", "dq", "dk", "dv") + (("dbias",) if "dbias" in hi else ()):
        floor = attention_floor_eps(name, hi, dout=inputs["dout"], q=inputs["q"], k=inputs["k"],
                                    dtype=case.dtype, head_dim=case.head_dim, seqlen_k=case.seqlen_k,
                                    bias_dtype=F32)
        assert_close_to_ref(got[name], hi[name], lo[name], name=f"{case} {name}", floor_eps=floor)
    # lse on rows with a key; (+inf, 0) exactly on empty rows.
    has_key = torch.isfinite(hi["lse"])
    assert torch.equal(torch.isfinite(got["lse"]), has_key), f"{case}: empty rows of lse"
    assert_close_to_ref(got["lse"][has_key], hi["lse"][has_key].double(), lo["lse"][has_key].double(),
                        name=f"{case} lse", floor_eps=16.0)
    planes = got["lse_planes"]
    assert torch.all(planes[0][~has_key] == float("inf")) and torch.all(planes[1][~has_key] == 0), f"{case}: lse"
    # Empty rows and keys no query sees: exact zeros (out, dq; dk, dv).
    visible = _visible(case, inputs)
    for b, vis in enumerate(visible):
        empty_q, unseen_k = ~vis.any(1), ~vis.any(0)
        for name, idx in (("out", empty_q), ("dq", empty_q), ("dk", unseen_k), ("dv", unseen_k)):
            rows = _rows(got[name], case, b)[idx]
            assert torch.equal(rows, torch.zeros_like(rows)), f"{case}: {name} not exactly 0 outside every window"
    if not case.varlen:  # the hand-computed visibility agrees with the reference's empty rows
        assert torch.equal(torch.stack([~v.any(1) for v in visible])[:, None].expand_as(has_key), ~has_key)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_host_window_matches_band_mask_reference(case):
    require_backend("cuda-host", "attention")
    check_window_case(case)


@pytest.mark.parametrize("dtype,head_dim", [(F16, 64), (F32, 40)])
def test_cuda_host_window_never_reads_tiles_outside_it(dtype, head_dim):
    """64 queries, 300 keys, window (0, 2): keys >= 128 lie beyond every tile the forward and dq
    kernels walk and are seen by no query. NaN in their K and V rows would reach the output
    (0 * NaN in P V) if any kernel loaded them into a product; their dk and dv are exact zeros."""
    require_backend("cuda-host", "attention")
    case = WindowCase(dtype, head_dim, (0, 2), 64, 300, batch=1)
    inputs = _inputs(case)
    dirty = dict(inputs)
    for n in ("k", "v"):
        dirty[n] = inputs[n].clone()
        dirty[n][:, 128:] = float("nan")
    got, clean = _kernel(case, dirty), _kernel(case, inputs)
    for name in ("out", "lse", "dq"):
        assert torch.equal(got[name], clean[name]), name
    for name in ("dk", "dv"):
        assert torch.equal(got[name][:, :128], clean[name][:, :128]), name
        assert torch.equal(got[name][:, 128:], torch.zeros_like(got[name][:, 128:])), name


def test_cuda_host_unbounded_window_is_bit_identical_to_none():
    """A window reaching past the sequence on both sides excludes nothing: the same bits as no
    window (70 queries, 90 keys: left >= 69 and right >= 89), up to the int64 bounds the binding takes
    (fastbert.ops clamps larger ones to the sequence before a backend sees them: test_window_attention's
    "wider-than-seq" case); a narrower one differs."""
    require_backend("cuda-host", "attention")
    base = WindowCase(F16, 64, None, 70, 90, mask=True, bias="B11K", dropout_p=0.1)
    inputs = _inputs(base)
    none = _kernel(base, inputs)
    for window in ((69, 89), (2**31, 2**63 - 1)):
        got = _kernel(dataclasses.replace(base, window=window), inputs)
        for name in ("out", "lse", "dq", "dk", "dv", "dbias"):
            assert torch.equal(got[name], none[name]), f"{window} {name}"
    narrower = _kernel(dataclasses.replace(base, window=(68, 89)), inputs)
    assert not torch.equal(narrower["out"], none["out"])


@pytest.mark.parametrize("override,message", [
    (dict(window_left=-2), "window: expected window_left, window_right >= 0"),
    (dict(window_right=-5), "window: expected window_left, window_right >= 0"),
])
def test_cuda_host_binding_rejects_a_bad_window(override, message):
    assert_host_binding_rejects(override, message)
