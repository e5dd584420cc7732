"""Local (sliding-window) attention, ``fastbert.ops.attention(..., window=(left, right))``.

- The reference against independent implementations: SDPA's math backend with a dense band mask
  (built with ``triu`` / ``tril``, not the reference's index arithmetic), padded and per sequence.
- Every registered backend whose capabilities declare ``"window"`` (the torch backend here;
  Triton under the interpreter and ``cuda-host`` join when they declare it) against the fp64
  reference, output and every gradient (q, k, v, bias), padded and varlen, with masks, biases
  and dropout, outputs poisoned: windows wider than the sequence, ``(0, 0)``, asymmetric,
  seqlen_q != seqlen_k, sequences shorter than a tile, empty varlen sequences, rows with no key.
- Empty rows (zeros, zero gradients, ``lse = (+inf, 0)``), dbias 0 outside the window, the
  dispatcher's feature, validation errors, the custom op under ``torch.compile``, nn modules.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_ref

from fastbert.backends import ALL_FEATURES, BackendSpec, CallInfo, OpCaps, all_backends, get_backend
from fastbert.ops import attention, resolve

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def window_backends() -> list[str]:
    """Backends declaring the window feature, except the reference (the arbiter)."""
    return [name for name, spec in all_backends().items()
            if name != "reference" and "attention" in spec.caps and "window" in spec.caps["attention"].features]


def _band(seqlen_q: int, seqlen_k: int, window) -> torch.Tensor:
    """Independent band mask: key j visible from row i iff -left <= j - i <= right (triu/tril)."""
    ones = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    return torch.triu(ones, diagonal=-window[0]) & torch.tril(ones, diagonal=window[1])


# ---------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    window: tuple
    dtype: torch.dtype = F32
    layout: str = "padded"
    batch: int = 2
    seqlen_q: int = 0
    seqlen_k: int = 0
    lengths: tuple = ()  # varlen
    heads: int = 2
    head_dim: int = 16
    mask: str | None = None  # None | "random" | "prefix" | "empty_row"
    bias: str | None = None  # None | "B1QK" | "BHQK" | "11QK" | "B11K"
    bias_grad: bool = False
    dropout_p: float = 0.0

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("sym-mask-bias", (4, 4), F32, seqlen_q=37, seqlen_k=37, mask="random", bias="B1QK", bias_grad=True),
    Case("zero-bias-dropout", (0, 0), F16, seqlen_q=9, seqlen_k=9, bias="BHQK", bias_grad=True, dropout_p=0.2),
    Case("left-only-q<k", (3, 0), BF16, seqlen_q=13, seqlen_k=21, mask="prefix"),
    Case("right-only-q>k-empty-rows", (0, 5), F32, seqlen_q=21, seqlen_k=7, bias="11QK", bias_grad=True),
    Case("wider-than-seq", (100, 1000), F32, seqlen_q=17, seqlen_k=17, mask="empty_row", dropout_p=0.1),
    Case("shorter-than-tile", (1, 1), F16, batch=3, seqlen_q=3, seqlen_k=3, mask="random", bias="B11K",
         bias_grad=True),
    Case("mask-and-window-empty", (1, 0), F32, batch=3, seqlen_q=11, seqlen_k=11, mask="prefix", dropout_p=0.2),
    Case("asym-fp64", (2, 6), F64, seqlen_q=19, seqlen_k=19, mask="random", bias="BHQK", bias_grad=True,
         dropout_p=0.3),
    Case("long-multi-block", (5, 20), F32, batch=2, seqlen_q=150, seqlen_k=150, heads=1, mask="random",
         bias="B11K", bias_grad=True, dropout_p=0.2),
    Case("long-q>k", (70, 3), BF16, batch=1, seqlen_q=140, seqlen_k=90, heads=1, mask="prefix"),
    Case("plain-q>k-some-empty", (2, 3), F32, batch=2, seqlen_q=150, seqlen_k=100, heads=1),
    Case("varlen-long", (33, 2), F32, layout="varlen", lengths=(130, 3, 0, 70), heads=1, dropout_p=0.1),
    Case("varlen", (2, 7), F32, layout="varlen", lengths=(5, 0, 1, 40, 3), dropout_p=0.1),
    Case("varlen-zero", (0, 0), BF16, layout="varlen", lengths=(7, 0, 9)),
    Case("varlen-wide", (64, 64), F16, layout="varlen", lengths=(2, 33, 0), dropout_p=0.2),
    Case("varlen-empty", (3, 1), F32, layout="varlen", lengths=(0, 0)),
    Case("varlen-asym", (9, 0), F32, layout="varlen", lengths=(1, 24, 6), head_dim=32),
]


def _inputs(case: Case) -> dict:
    """fp64 inputs rounded to the case's dtype, fresh per case (seeded by its name)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(case.dtype).to(F64)  # noqa: E731
    h, d = case.heads, case.head_dim
    if case.layout == "varlen":
        cu = [0]
        for n in case.lengths:
            cu.append(cu[-1] + n)
        total = cu[-1]
        return {"q": rnd(total, h, d), "k": rnd(total, h, d), "v": rnd(total, h, d), "dout": rnd(total, h, d),
                "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
    b, lq, lk = case.batch, case.seqlen_q, case.seqlen_k
    t = {"q": rnd(b, lq, h, d), "k": rnd(b, lk, h, d), "v": rnd(b, lk, h, d), "dout": rnd(b, lq, h, d)}
    if case.mask == "prefix":
        t["attention_mask"] = torch.arange(lk)[None] < torch.randint(1, lk + 1, (b,), generator=g)[:, None]
    elif case.mask is not None:
        m = torch.rand(b, lk, generator=g) > 0.4
        if case.mask == "empty_row":
            m[0] = False
        t["attention_mask"] = m
    if case.bias is not None:
        dims = {"B": b, "H": h, "Q": lq, "K": lk, "1": 1}
        t["attn_bias"] = rnd(*(dims[c] for c in case.bias))
    return t


def _run(case: Case, t: dict, backend: str, dtype) -> dict:
    """out and every gradient on ``backend`` computing in ``dtype`` (the dropout seed fixed)."""
    q, k, v = (t[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    leaves, kw = [q, k, v], {}
    for name in ("cu_seqlens", "attention_mask"):
        if name in t:
            kw[name] = t[name]
    if "attn_bias" in t:
        bias = t["attn_bias"].to(dtype).requires_grad_(case.bias_grad)
        kw["attn_bias"] = bias
        if case.bias_grad:
            leaves.append(bias)
    torch.manual_seed(1234)
    out = attention(q, k, v, window=case.window, dropout_p=case.dropout_p, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, t["dout"].to(dtype))
    return dict(zip(["out", "dq", "dk", "dv", "dbias"], [out.detach()] + list(grads)))


def _check(case: Case, backend: str, label: str = "") -> None:
    """out and every gradient of ``case`` on ``backend`` vs the reference in fp64 and in the case's
    dtype (the tolerance rule, floor 16 eps)."""
    t = _inputs(case)
    got = _run(case, t, backend, case.dtype)
    hi = _run(case, t, "reference", F64)
    lo = _run(case, t, "reference", case.dtype)
    assert set(got) == set(hi)
    for name in hi:
        assert_close_to_ref(got[name], hi[name], lo[name], name=f"{label}{case} {name}", floor_eps=16.0)


def _supported(backend: str, case: Case) -> str | None:
    caps = get_backend(backend).caps["attention"]
    if case.dtype not in caps.dtypes:
        return f"{backend} does not declare {case.dtype}"
    if caps.head_dims is not None and not caps.head_dims(case.head_dim):
        return f"{backend} does not declare head_dim {case.head_dim}"
    return get_backend(backend).unavailable_reason("attention")


# ------------------------------------------------------------------- backends vs the fp64 reference


# Under the Triton interpreter these three long cases cost ~45% of the Triton time of this file; by
# default Triton runs every other case here (long-q>k: a long padded band; varlen, varlen-wide:
# varlen with dropout) and test_triton_window.py's multi-tile bands. Every other backend runs them.
TRITON_SLOW = ("long-multi-block", "varlen-long", "plain-q>k-some-empty")


@pytest.mark.parametrize("backend,case", [
    pytest.param(b, c, id=f"{b}-{c}", marks=pytest.mark.slow if b == "triton" and c.name in TRITON_SLOW else ())
    for b in window_backends() for c in CASES])
def test_backend_matches_reference(backend, case, poison):
    reason = _supported(backend, case)
    if reason is not None:
        pytest.skip(reason)
    _check(case, backend, label=f"{backend} ")


SMALL_BLOCK_CASES = [c for c in CASES if c.name in ("sym-mask-bias", "zero-bias-dropout", "right-only-q>k-empty-rows",
                                                    "mask-and-window-empty", "varlen", "varlen-asym",
                                                    "plain-q>k-some-empty", "varlen-zero")]


@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=str)
def test_torch_blockwise_small_blocks(case, monkeypatch, poison):
    """The torch backend's blocks of query rows at a block size of 5: many blocks, partial last
    blocks, blocks whose window reaches no key, on small shapes."""
    from fastbert.backends.torch import _window as tb

    monkeypatch.setattr(tb, "WINDOW_BLOCK", 5)
    _check(case, "torch")


@pytest.mark.parametrize("case", [c for c in CASES if c.layout == "varlen"], ids=str)
def test_torch_varlen_repadded_path(case, monkeypatch, poison):
    """The torch backend's varlen path for GPUs (re-padded to max_seqlen, no host sync), run on
    the CPU."""
    from fastbert.backends.torch import _window as tb

    monkeypatch.setattr(tb, "_varlen_per_sequence", lambda q: False)
    _check(case, "torch")


@pytest.mark.parametrize("seqlen,window", [(8192, (64, 64)), (1000, (0, 0)), (777, (300, 5)), (50, (64, 64))])
def test_torch_blockwise_cost_is_seqlen_times_window(seqlen, window):
    """The scores the torch backend's blocks compute: at most seqlen x (block + left + right), not
    seqlen^2, and every in-window (row, key) pair lies in its row's block."""
    from fastbert.backends.torch import _window as tb

    blocks = list(tb._window_blocks(seqlen, seqlen, window))
    work = sum((qe - qs) * max(0, ke - ks) for qs, qe, ks, ke in blocks)
    assert work <= seqlen * (tb.WINDOW_BLOCK + window[0] + window[1])
    assert [b[:2] for b in blocks] == [(s, min(s + tb.WINDOW_BLOCK, seqlen)) for s in range(0, seqlen, tb.WINDOW_BLOCK)]
    for qs, qe, ks, ke in blocks:
        assert ks == max(0, qs - window[0]) and ke == min(seqlen, qe - 1 + window[1] + 1)


def test_window_backends_include_torch():
    assert "torch" in window_backends()
    assert "window" in get_backend("reference").caps["attention"].features


@pytest.mark.parametrize("backend", ["reference"] + window_backends())
def test_wider_than_sequence_equals_global(backend):
    """A window wider than the sequence is global attention (here beside the global path of the
    same backend, which may compute it another way: fp32 tolerance)."""
    if get_backend(backend).unavailable_reason("attention") or F32 not in get_backend(backend).caps["attention"].dtypes:
        pytest.skip(f"{backend} unavailable here")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 13, 2, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 13, generator=g) > 0.3
    got = attention(q, k, v, attention_mask=mask, window=(12, 12), backend=backend)
    want = attention(q, k, v, attention_mask=mask, backend=backend)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------- the reference is independent


def _sdpa_band(q, k, v, window, mask=None, bias=None):
    """SDPA math backend with a dense band mask (plus padding mask / bias), heads-last layout."""
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    allowed = _band(lq, lk, window)[None, None].expand(b, h, lq, lk)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    rows = allowed.any(-1, keepdim=True)  # [B, H, Lq, 1]
    # A row without a key would be NaN in SDPA: it attends everything and is zeroed after.
    attn = torch.zeros(b, h, lq, lk, dtype=q.dtype).masked_fill(~allowed & rows, float("-inf"))
    if bias is not None:
        attn = attn + bias
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn)
    has_key = rows.transpose(1, 2)  # [B, Lq, H, 1]
    return torch.where(has_key, out.transpose(1, 2), 0.0), has_key


@pytest.mark.parametrize("lq,lk,window", [(11, 11, (2, 2)), (9, 14, (0, 3)), (14, 9, (4, 0)), (6, 6, (0, 0)),
                                          (5, 8, (20, 20))])
def test_reference_matches_sdpa_band_mask(lq, lk, window):
    g = torch.Generator().manual_seed(lq * 31 + lk)
    q = torch.randn(2, lq, 2, 8, generator=g, dtype=F64, requires_grad=True)
    k, v = (torch.randn(2, lk, 2, 8, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, lk, generator=g) > 0.3
    bias = torch.randn(2, 1, lq, lk, generator=g, dtype=F64, requires_grad=True)
    out = attention(q, k, v, attention_mask=mask, attn_bias=bias, window=window, backend="reference")
    ref, has_key = _sdpa_band(q, k, v, window, mask, bias)
    assert torch.equal(out.detach() * ~has_key, torch.zeros_like(out))  # rows without a key: zeros
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(out, [q, k, v, bias], dout)
    want = torch.autograd.grad(ref, [q, k, v, bias], dout)
    for name, a, b in zip(["dq", "dk", "dv", "dbias"], got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    outside = ~_band(lq, lk, window)[None, None].expand_as(got[3])
    assert torch.equal(got[3][outside], torch.zeros_like(got[3][outside]))


def test_reference_varlen_matches_per_sequence_band():
    lengths, window = [6, 0, 1, 17], (3, 1)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, cu_seqlens=cu, window=window, backend="reference")
    parts = [_sdpa_band(q[None, a:b], k[None, a:b], v[None, a:b], window)[0][0]
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    ref = torch.cat(parts)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], dout), torch.autograd.grad(ref, [q, k, v], dout)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_modernbert_convention():
    """transformers' ModernBERT: local_attention = w sees abs(i - j) <= w // 2: window (w//2, w//2)."""
    w, L = 8, 20
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, L, 1, 8, generator=g, dtype=F64) for _ in range(3))
    i = torch.arange(L)
    allowed = (i[:, None] - i[None, :]).abs() <= w // 2
    bias = torch.zeros(L, L, dtype=F64).masked_fill(~allowed, float("-inf"))
    got = attention(q, k, v, window=(w // 2, w // 2), backend="reference")
    torch.testing.assert_close(got, attention(q, k, v, attn_bias=bias, backend="reference"), atol=1e-13, rtol=0)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 5, 1, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 5, 5, generator=g, dtype=F64, requires_grad=True)
    f = lambda q, k, v, b: attention(q, k, v, attn_bias=b, window=(1, 2), backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, bias))


@pytest.mark.parametrize("backend", ["reference"] + window_backends())
def test_masked_keys_have_no_influence(backend, poison):
    """NaN / Inf in the K and V rows of keys masked by attention_mask change nothing, with a window."""
    if get_backend(backend).unavailable_reason("attention"):
        pytest.skip(f"{backend} unavailable here")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 70, 2, 16, generator=g)
    k, v = (torch.randn(2, 70, 2, 16, generator=g) for _ in range(2))
    mask = torch.rand(2, 70, generator=g) > 0.3
    bad = ~mask[:, :, None, None]
    kp, vp = torch.where(bad, float("nan"), k), torch.where(bad, float("inf"), v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, q, kp, vp)]
    dout = torch.randn(q.shape, generator=g)
    res = []
    for qq, kk, vv in (leaves[:3], leaves[3:]):
        out = attention(qq, kk, vv, attention_mask=mask, window=(3, 9), backend=backend)
        res.append([out] + list(torch.autograd.grad(out, [qq, kk, vv], dout)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- empty rows


@pytest.mark.parametrize("backend", ["reference"] + window_backends())
def test_rows_without_key_are_empty(backend, poison):
    """Rows whose window holds no valid key return zeros, pass zero gradients and store
    lse = (+inf, 0) where the backend writes lse."""
    if get_backend(backend).unavailable_reason("attention"):
        pytest.skip(f"{backend} unavailable here")
    from fastbert.ops.attention import _attention_fwd

    g = torch.Generator().manual_seed(11)
    lq, lk = 12, 6
    q = torch.randn(2, lq, 2, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, lk, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, 3:] = False  # sequence 1: rows >= 3 + 1 see nothing with window (1, 0)... and rows >= lk anyway
    window = (1, 0)
    out = attention(q, k, v, attention_mask=mask, window=window, backend=backend)
    allowed = _band(lq, lk, window)[None] & mask[:, None, :]  # [B, Lq, Lk]
    empty = ~allowed.any(-1)  # [B, Lq]
    assert empty[0].sum() == lq - lk - 1 and empty[1].sum() > empty[0].sum()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert out[~empty].abs().sum() > 0
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], torch.randn(out.shape, generator=g))
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
    assert not dq.isnan().any() and not dk.isnan().any() and not dv.isnan().any()
    _, lse = _attention_fwd(q.detach(), k.detach(), v.detach(), mask, None, None, None, 0, 0.0, 0.25, False, False,
                            backend, *window)
    if lse.numel():
        e = empty[:, None, :].expand(2, 2, lq)
        assert torch.isposinf(lse[0][e]).all() and (lse[1][e] == 0).all()
        assert torch.isfinite(lse[0][~e]).all()


# ---------------------------------------------------------------------- contract plumbing


@pytest.mark.parametrize("bad", [(1,), (1, 2, 3), (1.0, 2), (True, 1), (1, False), "ab", 5, (-1, 0), (0, -3),
                                 [2, -1]])
def test_bad_window_names_the_argument(bad):
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises((TypeError, ValueError), match=r"window: expected .*got " + repr(bad).replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        attention(q, q, q, window=bad)


def test_list_window_is_accepted():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 1, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, window=[1, 2]), attention(q, k, v, window=(1, 2)))


def test_dispatch_feature():
    """A window call carries the "window" feature; a backend declaring only ALL_FEATURES refuses it."""
    call = CallInfo("attention", "cpu", F32, 16, frozenset({"window"}))
    assert resolve(call) == "torch"
    assert "window" not in ALL_FEATURES
    spec = BackendSpec(name="no-window", module="fastbert.backends.torch",
                       caps={"attention": OpCaps(devices=("cpu",), dtypes=(F32,), features=ALL_FEATURES)})
    assert spec.reasons(call) == ["features not supported: window"]
    assert spec.reasons(CallInfo("attention", "cpu", F32, 16, frozenset())) == []


def test_window_is_clamped_before_the_backend(monkeypatch):
    """Backends see (left, right) clamped to the sequence (the result is the same), as Python ints."""
    from fastbert.backends.torch import attention as tb

    seen = []
    real = tb._window_attention_fwd

    def spy(*a, **kw):
        seen.append(kw["window"])
        return real(*a, **kw)

    monkeypatch.setattr(tb, "_window_attention_fwd", spy)
    q = torch.randn(1, 5, 1, 8)
    k = torch.randn(1, 7, 1, 8)
    attention(q, k, k, window=(10**12, 3), backend="torch")
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    attention(q[0], q[0], q[0], cu_seqlens=cu, window=(1, 99), backend="torch")
    assert seen == [(5, 3), (1, 3)] and all(type(x) is int for w in seen for x in w)


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 6, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 6, generator=g) > 0.3
    args = (q, k, v, mask, None, None, torch.tensor([1, 2]), 0, 0.1, 0.35, False, False, "torch", 2, 1)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)
    f = lambda q, k, v: attention(q, k, v, attention_mask=mask, window=(2, 1), backend="torch")  # noqa: E731
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    dout = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, [q, k, v], dout), torch.autograd.grad(want, [q, k, v], dout)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- nn modules


def test_self_attention_module_window():
    from fastbert.nn.bert import BertSelfAttention

    cfg = SimpleNamespace(hidden_size=32, num_attention_heads=4, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = BertSelfAttention(cfg, window=(2, 1)).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ctx, probs = m(x, mask, output_attentions=True)
    v = m.value(x).view(2, 9, 4, 8)
    torch.testing.assert_close(ctx, torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 9, 32), atol=1e-5, rtol=1e-5)
    outside = ~_band(9, 9, (2, 1))
    assert (probs[:, :, outside] == 0).all() and (probs[:, :, ~outside].sum() > 0)
    m.window = None  # per layer, as an attribute
    ctx_global, probs_global = m(x, mask, output_attentions=True)
    assert (probs_global[0][:, outside] > 0).all()
    assert not torch.allclose(ctx, ctx_global)


# ---------------------------------------------------------------------------------- benchmark


def test_bench_window_smoke(tmp_path, capsys):
    """``python -m fastbert.bench.window`` end to end on tiny sizes: its correctness check, a row
    per (seqlen, direction) with positive times, the JSON file."""
    import json

    from fastbert.bench import window as bench

    path = tmp_path / "window.json"
    assert bench.main(["--quick", "--seqlens", "96,160", "--heads", "1", "--head-dim", "16", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["seqlen"], r["direction"]) for r in res["rows"]] == [(96, "fwd"), (96, "fwd+bwd"), (160, "fwd"),
                                                                      (160, "fwd+bwd")]
    assert all(r["global_s"] > 0 and r["window_s"] > 0 and r["rounds"] == 2 for r in res["rows"])
    assert res["check_max_abs_err"] <= 1e-4 and len(res["load_before"]) == 3
    assert "win/glob" in capsys.readouterr().out
    assert bench.attention_flops(10, 1, 1, (1, 1), "fwd") == 4.0 * (10 * 3 - 2)
