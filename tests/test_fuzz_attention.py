"""Differential fuzz of ``fastbert.ops.attention``: every backend that runs on the CPU (the torch
backend, Triton under the interpreter, the CUDA kernels through ``cuda-host``, and the reference
itself in low precision) x forward and backward, against the reference in fp64.

Each seeded case draws shapes (0-size, 1, primes), dtypes (q and a bias of its own dtype), masks
(bool / int / float 0-1; random, prefix, an all-zero row, an all-zero batch), biases (every
broadcast shape, ``-inf`` rows and keys, ``finfo.min`` and -1e5 rows), strided and expanded views of
every tensor argument (q/k/v, mask, bias, ``cu_seqlens``), varlen with empty sequences, dropout
(the same seed gives the same mask: compared with the reference's Philox mask), and NaN / Inf in
masked positions (K and V rows of keys masked by ``attention_mask``, the bias there), local windows
(on backends declaring the ``"window"`` feature, drawn apart so other draws stay put): the output
and every gradient must match the fp64 reference computed on clean inputs (STYLE.md's tolerance
rule, tests/_tolerance.py), with outputs poisoned (NaN) before the backends write them.

``cuda-host`` cases run in child processes (tests/_fuzz.py): a crash is a failure that prints the
case. The default run is bounded (``DEFAULT_COUNTS``); ``-m slow`` runs ``SLOW_COUNTS`` more cases
under another seed. Reproduce one case: ``check_by_id("<id>")``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pytest
import torch
from _fuzz import SubprocessRunner, case_rng
from _tolerance import assert_close_to_ref, attention_floor_eps

from fastbert.backends import get_backend
from fastbert.ops import attention, poisoned_outputs

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {F64: "f64", F32: "f32", F16: "f16", BF16: "bf16"}
BACKENDS = ("reference", "torch", "triton", "cuda-host")
DEFAULT_COUNTS = {"reference": 20, "torch": 50, "triton": 35, "cuda-host": 45}
SLOW_COUNTS = {"reference": 100, "torch": 200, "triton": 100, "cuda-host": 150}
DEFAULT_SEED, SLOW_SEED = 12, 1012
BIAS_SHAPES = ("K", "QK", "111K", "B11K", "1HQK", "B1QK", "H1K", "BHQK")


@dataclass(frozen=True)
class AttnCase:
    """One fuzz case; ``id`` names the suite seed, the index and the backend."""

    id: str
    backend: str
    dtype: torch.dtype
    layout: str  # "padded" | "varlen"
    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads: int
    head_dim: int
    lengths: tuple = ()  # varlen
    give_max_seqlen: bool = True
    mask: str | None = None  # None | "bool" | "int" | "float"
    mask_pattern: str = "random"  # "random" | "prefix" | "empty_row" | "empty_batch"
    bias_shape: str | None = None  # a key of BIAS_SHAPES
    bias_dtype: torch.dtype | None = None
    bias_special: str | None = None  # None | "-inf_row" | "-inf_key" | "finfo_min_row" | "big_neg_row"
    views: frozenset = field(default_factory=frozenset)  # see _inputs
    dropout_p: float = 0.0
    poison_masked: bool = False  # NaN / Inf in the K, V rows and bias entries of masked keys
    grad: bool = True
    bias_grad: bool = False
    window: tuple | None = None  # local attention (left, right), for backends declaring "window"

    def __str__(self) -> str:
        return self.id


def _supports(backend: str, dtype, head_dim: int) -> bool:
    caps = get_backend(backend).caps["attention"]
    return dtype in caps.dtypes and (caps.head_dims is None or caps.head_dims(head_dim))


WINDOWS = ((0, 0), (1, 1), (2, 5), (5, 0), (0, 3), (64, 64), (100, 7))


def _window(backend: str, seed: int, i: int):
    """A local window for about a third of the cases of a backend that declares the feature, from
    a generator of its own (the other draws of a case do not change with the feature)."""
    if "window" not in get_backend(backend).caps["attention"].features:
        return None
    rng = case_rng(seed, f"{i}:window")
    return rng.choice(WINDOWS) if rng.random() < 0.35 else None


def _draw(backends_cycle: tuple, seed: int, slow: bool):
    def draw(rng, i) -> AttnCase:
        backend = backends_cycle[i % len(backends_cycle)]
        kernel = backend in ("triton", "cuda-host")
        dtypes = [F32, F16, BF16] + ([] if kernel else [F64])
        dtype = rng.choice(dtypes)
        head_dims = [8, 16, 24, 32, 40, 64] + ([96, 128] if slow else [])
        if not kernel:
            head_dims += [1, 5, 26]
        head_dim = rng.choice(head_dims)
        heads = rng.choice([1, 2] + ([3] if slow else []))
        small = [1, 2, 3, 5, 7, 11, 13, 17] + ([31, 33, 37, 64, 65] if slow or backend in ("torch", "reference") else [])
        kw = dict(id=f"s{seed}-{i}-{backend}", backend=backend, dtype=dtype, num_heads=heads,
                  head_dim=head_dim, dropout_p=rng.choice([0.0, 0.0, 0.0, 0.2]), grad=rng.random() < 0.8,
                  window=_window(backend, seed, i))
        views = set()
        if rng.random() < 0.25:  # varlen
            n_seq = rng.choice([1, 2, 3, 4])
            lengths = tuple(rng.choice([0, 0, 1, 2, 5, 7, 13] + ([31, 40] if slow else [])) for _ in range(n_seq))
            if rng.random() < 0.1:
                lengths = (0,) * n_seq  # total_tokens 0
            for v in ("qkv_packed", "cu_strided", "cu_offset"):
                if rng.random() < 0.4:
                    views.add(v)
            return AttnCase(layout="varlen", batch=n_seq, seqlen_q=0, seqlen_k=0, lengths=lengths,
                            give_max_seqlen=rng.random() < 0.7, views=frozenset(views), **kw)
        batch = rng.choice([1, 2, 3] + ([0] if rng.random() < 0.05 else []))
        lq = rng.choice(small)
        lk = lq if rng.random() < 0.5 else rng.choice(small + ([0] if rng.random() < 0.05 else []))
        mask = rng.choice([None, "bool", "int", "float", "bool"])
        pattern = rng.choice(["random", "prefix", "empty_row", "empty_batch"] if mask else ["random"])
        bias_shape = rng.choice([None, None] + list(BIAS_SHAPES))
        bias_dtype = special = None
        if bias_shape is not None:
            pairs = [dtype, dtype, F32, F16, BF16, F64]
            bias_dtype = F64 if dtype == F64 else rng.choice(pairs)
            special = rng.choice([None, None, "-inf_row", "-inf_key", "finfo_min_row", "big_neg_row"])
        poison = mask is not None and rng.random() < 0.35
        for v, p in (("qkv_packed", 0.3), ("q_transposed", 0.2), ("kv_expanded", 0.15), ("last_dim_strided", 0.1),
                     ("mask_strided", 0.3), ("mask_expanded", 0.15), ("bias_strided", 0.3), ("bias_expanded", 0.3)):
            if rng.random() < p:
                views.add(v)
        if "qkv_packed" in views and lq != lk:
            views.discard("qkv_packed")
        if "kv_expanded" in views:
            views.discard("qkv_packed")
            if poison:  # poisoned rows differ per sequence: no shared K/V
                views.discard("kv_expanded")
        return AttnCase(layout="padded", batch=batch, seqlen_q=lq, seqlen_k=lk, mask=mask, mask_pattern=pattern,
                        bias_shape=bias_shape, bias_dtype=bias_dtype, bias_special=special, views=frozenset(views),
                        poison_masked=poison, bias_grad=bias_shape is not None and rng.random() < 0.6, **kw)
    return draw


def _cases(counts: dict, seed: int, slow: bool) -> dict[str, list[AttnCase]]:
    out = {}
    for backend, n in counts.items():
        bseed = seed + 7919 * BACKENDS.index(backend)
        draw, drawn, i = _draw((backend,), bseed, slow), [], 0
        while len(drawn) < n:  # draw until the backend has n cases it declares support for
            case = draw(case_rng(bseed, i), i)
            i += 1
            if _supports(backend, case.dtype, case.head_dim):
                drawn.append(case)
        out[backend] = drawn
    return out


DEFAULT_CASES = _cases(DEFAULT_COUNTS, DEFAULT_SEED, slow=False)
SLOW_CASES = _cases(SLOW_COUNTS, SLOW_SEED, slow=True)
CASES_BY_ID = {c.id: c for cs in list(DEFAULT_CASES.values()) + list(SLOW_CASES.values()) for c in cs}

# ---------------------------------------------------------------------------------------------- inputs


def _mask_values(case: AttnCase, g: torch.Generator) -> torch.Tensor:
    b, lk = case.batch, case.seqlen_k
    if case.mask_pattern == "prefix":
        lengths = torch.randint(1, max(lk, 1) + 1, (b,), generator=g)
        m = torch.arange(lk)[None, :] < lengths[:, None]
    else:
        m = torch.rand(b, lk, generator=g) > 0.35
        if lk:
            m[:, torch.randint(0, lk, (1,), generator=g)] = True
    if case.mask_pattern == "empty_row" and b:
        m[torch.randint(0, b, (1,), generator=g)] = False
    if case.mask_pattern == "empty_batch":
        m[:] = False
    return m


def _bias_values(case: AttnCase, g: torch.Generator) -> torch.Tensor:
    b, h, lq, lk = case.batch, case.num_heads, case.seqlen_q, case.seqlen_k
    dims = {"B": b, "H": h, "Q": lq, "K": lk, "1": 1}
    shape = tuple(dims[c] for c in case.bias_shape)
    bias = torch.randn(shape, generator=g, dtype=F64)
    if case.bias_special and bias.numel():
        full = bias.expand(b, h, lq, lk) if bias.dim() == 4 else bias
        sel = [slice(None)] * bias.dim()
        special = {"-inf_row": float("-inf"), "-inf_key": float("-inf"),
                   "finfo_min_row": torch.finfo(case.bias_dtype).min, "big_neg_row": -1e5}[case.bias_special]
        if case.bias_special == "-inf_key":
            sel[-1] = int(torch.randint(0, lk, (1,), generator=g))
        elif bias.dim() >= 2:
            sel[-2] = int(torch.randint(0, bias.shape[-2], (1,), generator=g))  # one (broadcast) query row
        bias[tuple(sel)] = special
        del full
    return bias


def _inputs(case: AttnCase, seed: int = 0) -> dict:
    """fp64 master inputs, already rounded to the case's dtypes (so the fp64 reference sees the
    very values the backend sees), keyed by argument name."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + seed)
    h, d = case.num_heads, case.head_dim
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(case.dtype).to(F64)  # noqa: E731
    t: dict = {}
    if case.layout == "varlen":
        cu = [0]
        for n in case.lengths:
            cu.append(cu[-1] + n)
        t["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        total = cu[-1]
        t["q"], t["k"], t["v"], t["dout"] = (rnd(total, h, d) for _ in range(4))
        return t
    b, lq, lk = case.batch, case.seqlen_q, case.seqlen_k
    t["q"], t["k"], t["v"] = rnd(b, lq, h, d), rnd(b, lk, h, d), rnd(b, lk, h, d)
    if "kv_expanded" in case.views:  # one K/V sequence shared by the batch (stride-0 batch dim)
        t["k"], t["v"] = t["k"][:1].expand_as(t["k"]).clone(), t["v"][:1].expand_as(t["v"]).clone()
    t["dout"] = rnd(b, lq, h, d)
    if case.mask is not None:
        t["attention_mask"] = _mask_values(case, g)
        if "mask_expanded" in case.views:  # every sequence the same mask: passed as a stride-0 view
            t["attention_mask"] = t["attention_mask"][:1].expand_as(t["attention_mask"]).clone()
    if case.bias_shape is not None:
        t["attn_bias"] = _bias_values(case, g).to(case.bias_dtype).to(F64)
    return t


def _poison(t: dict) -> dict:
    """NaN / Inf / huge values in every position a masked key holds: its K and V rows, and its bias
    entries where the bias has a batch dim (else other sequences attend those entries)."""
    t = dict(t)
    keep = t["attention_mask"]  # [B, Lk]
    bad = ~keep[:, :, None, None]
    fill = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38], dtype=F64)
    pattern = fill[torch.arange(t["k"].shape[1]) % 4][None, :, None, None]
    t["k"] = torch.where(bad, pattern, t["k"])
    t["v"] = torch.where(bad, pattern.roll(1, 1), t["v"])
    if "attn_bias" in t:
        bias = t["attn_bias"]
        b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        if (b4.shape[0] == keep.shape[0] or keep.shape[0] == 1) and b4.shape[-1] == keep.shape[1]:
            b4 = torch.where(~keep[:, None, None, :], float("nan"), b4)
            t["attn_bias"] = b4.reshape(bias.shape)
    return t


def _view(x: torch.Tensor) -> torch.Tensor:
    """The same values through a strided last dim (every other element of a twice-as-wide tensor
    whose other half is garbage)."""
    junk = ~x if x.dtype == torch.bool else (x + 7 if not x.is_floating_point() else torch.full_like(x, float("nan")))
    return torch.stack([x, junk], dim=-1).flatten(-2)[..., ::2]


def _run(case: AttnCase, t: dict, backend: str, dtype, *, subject: bool):
    """out and the gradients on ``backend`` computing in ``dtype``; ``subject`` applies the case's
    views (the reference runs on plain contiguous tensors)."""
    bias_dtype = F64 if dtype == F64 else case.bias_dtype
    views = case.views if subject else frozenset()
    leaves, kw = [], {}
    if "qkv_packed" in views:
        qkv = torch.stack([t["q"], t["k"], t["v"]], dim=-3).to(dtype).requires_grad_(case.grad)
        q, k, v = qkv.unbind(-3)
        leaves.append(("qkv", qkv))
    else:
        q, k, v = (t[n].to(dtype).requires_grad_(case.grad) for n in ("q", "k", "v"))
        leaves += [("q", q), ("k", k), ("v", v)]
        if "kv_expanded" in views:  # one K/V sequence shared by the batch: stride-0 batch dim
            k, v = (t[n][:1].to(dtype).requires_grad_(case.grad) for n in ("k", "v"))
            leaves[1:] = [("k", k), ("v", v)]
            k, v = k.expand_as(t["k"]), v.expand_as(t["v"])
        if "q_transposed" in views:  # a [B, H, L, d] tensor seen as [B, L, H, d]
            q = t["q"].to(dtype).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(case.grad)
            leaves[0] = ("q", q)
        if "last_dim_strided" in views:  # copied by fastbert.ops (kernels need a contiguous last dim)
            q = _view(t["q"].to(dtype)).requires_grad_(case.grad)
            leaves[0] = ("q", q)
    if case.layout == "varlen":
        cu = t["cu_seqlens"]
        if "cu_strided" in views:  # interleaved with garbage: read through the stride
            cu = torch.stack([cu, torch.full_like(cu, 10**6)], dim=-1).flatten()[::2]
        if "cu_offset" in views:  # a view with a storage offset
            cu = torch.cat([torch.tensor([-7], dtype=torch.int32), cu])[1:]
        kw["cu_seqlens"] = cu
        if case.give_max_seqlen:
            kw["max_seqlen"] = max(case.lengths, default=0)
    if "attention_mask" in t:
        m = t["attention_mask"]
        m = {"bool": m, "int": m.to(torch.int64), "float": m.to(torch.float32)}[case.mask]
        if "mask_strided" in views:
            m = _view(m)
        if "mask_expanded" in views:
            m = m[:1].expand_as(m)
        kw["attention_mask"] = m
    if "attn_bias" in t:
        bias = t["attn_bias"].to(bias_dtype)
        if "bias_strided" in views:
            bias = _view(bias)
        leaf = bias.requires_grad_(case.bias_grad and case.grad)
        if "bias_expanded" in views:  # the broadcast made explicit: stride-0 dims of a 4-D view
            bias = leaf.expand(case.batch, case.num_heads, case.seqlen_q, case.seqlen_k)
        kw["attn_bias"] = bias
        if case.bias_grad and case.grad:
            leaves.append(("dbias", leaf))
    torch.manual_seed(4321)  # the dropout seed: the same draw in every run
    out = attention(q, k, v, dropout_p=case.dropout_p, backend=backend, window=case.window, **kw)
    res = {"out": out.detach()}
    if case.grad:
        grads = torch.autograd.grad(out, [x for _, x in leaves], t["dout"].to(out.dtype))
        for (name, _), gr in zip(leaves, grads):
            if name == "qkv":
                res["dq"], res["dk"], res["dv"] = gr.unbind(-3)
            elif name == "dbias":
                res[name] = gr
            else:
                if "kv_expanded" in case.views and name in ("k", "v"):  # compare the shared K/V's gradient
                    gr = gr.sum(0, keepdim=True) if gr.shape[0] != 1 else gr
                res["d" + name] = gr
    return res


def _floor_eps(name: str, case: AttnCase, t: dict, hi: dict) -> float:
    """The attention rule's floor (``_tolerance.attention_floor_eps``) for this case."""
    return attention_floor_eps(name, hi, dout=t["dout"], q=t["q"], k=t["k"], dtype=case.dtype,
                               head_dim=case.head_dim, seqlen_k=case.seqlen_k, bias_dtype=case.bias_dtype)


def check(case: AttnCase) -> None:
    """The backend's output and gradients (on poisoned inputs when the case says so, through the
    case's views) against the fp64 reference on clean inputs; the reference in the case's dtype
    gives PyTorch's own low-precision error."""
    t = _inputs(case)
    subject_inputs = _poison(t) if case.poison_masked else t
    with poisoned_outputs(True):
        got = _run(case, subject_inputs, case.backend, case.dtype, subject=True)
    hi = _run(case, t, "reference", F64, subject=False)
    lo = _run(case, t, "reference", case.dtype, subject=False)
    assert set(got) == set(hi), f"{case}: outputs {sorted(got)} != {sorted(hi)}"
    for name in hi:
        assert_close_to_ref(got[name], hi[name], lo[name], name=f"{case!r}\n{name}",
                            floor_eps=_floor_eps(name, case, t, hi))
    if case.bias_special == "finfo_min_row" and case.dropout_p == 0.0 and case.mask is None and case.window is None:
        _check_finfo_rows(case, t, got)


def _check_finfo_rows(case: AttnCase, t: dict, got: dict) -> None:
    """The rule, checked on its own: a row whose keys are all biased ``finfo(fp32 | bf16 | fp64).min``
    averages V (its scores are equal in fp32); ``finfo(fp16).min`` leaves scores distinct."""
    if case.bias_dtype == F16 or not t["v"].numel():
        return
    full = t["attn_bias"].expand(case.batch, case.num_heads, case.seqlen_q, case.seqlen_k)
    rows = (full == torch.finfo(case.bias_dtype).min).all(-1)  # [B, H, Lq]
    if not rows.any():
        return
    mean_v = t["v"].mean(1)  # [B, H, d]
    want = mean_v[:, None].expand(-1, case.seqlen_q, -1, -1)  # [B, Lq, H, d]
    sel = rows.transpose(1, 2)  # [B, Lq, H]
    assert_close_to_ref(got["out"][sel], want[sel], None, name=f"{case!r}\nfinfo.min rows average V",
                        floor_eps=8.0)


def check_by_id(case_id: str) -> None:
    check(CASES_BY_ID[case_id])


# ---------------------------------------------------------------------------------------------- tests

_RUNNER = SubprocessRunner("test_fuzz_attention")


def _param(cases: dict) -> list:
    return [pytest.param(c, id=c.id) for b in BACKENDS for c in cases[b]]


def _run_case(case: AttnCase, all_cases: dict) -> None:
    reason = get_backend(case.backend).unavailable_reason("attention")
    if reason is not None:
        pytest.skip(f"{case.backend}: {reason}")
    if case.backend == "cuda-host":  # C++: in a child process, all the suite's cases in one go
        ids = [c.id for c in all_cases["cuda-host"]]
        error = _RUNNER.results(ids)[case.id]
        if error is not None:
            pytest.fail(f"{case!r}\n{error}", pytrace=False)
        return
    check(case)


@pytest.mark.parametrize("case", _param(DEFAULT_CASES))
def test_fuzz_attention(case):
    _run_case(case, DEFAULT_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", _param(SLOW_CASES))
def test_fuzz_attention_slow(case):
    _run_case(case, SLOW_CASES)


def test_fuzz_case_counts():
    """The suite's size per backend (reported in the issue note); every case is drawn for a
    backend that declares its dtype and head_dim, so no case is skipped silently."""
    assert {b: len(c) for b, c in DEFAULT_CASES.items()} == DEFAULT_COUNTS
    assert {b: len(c) for b, c in SLOW_CASES.items()} == SLOW_COUNTS
    assert len(CASES_BY_ID) == sum(DEFAULT_COUNTS.values()) + sum(SLOW_COUNTS.values())


def test_subprocess_runner_reports_a_crash_with_its_case(tmp_path, monkeypatch):
    """The runner can fail: a child killed by SIGSEGV inside case "b" makes "b" a failure naming
    it and the signal, and a new child still runs the cases after it."""
    import os

    (tmp_path / "_fuzz_crashy.py").write_text(
        "import os, signal\n"
        "def check_by_id(case_id):\n"
        "    if case_id == 'b':\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    assert case_id != 'c', 'case c fails'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = SubprocessRunner("_fuzz_crashy").results(["a", "b", "c", "d"])
    assert res["a"] is None and res["d"] is None
    assert "CRASH in case b" in res["b"] and "status -11" in res["b"]
    assert "case c fails" in res["c"]
