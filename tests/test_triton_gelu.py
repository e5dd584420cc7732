"""Triton GELU with bias through ``fastbert.ops.gelu(..., backend="triton")``: parity of y, dx and
dbias with the reference (STYLE.md's rule), the negative tail against exact erf GELU, the tanh
form, determinism and the custom-op check. Runs under ``TRITON_INTERPRET=1`` on CPU (conftest)."""

from __future__ import annotations

import math

import pytest
import torch
from _pairwise import covers_every_pair, full_product, pairwise
from _tolerance import assert_close_to_ref

pytest.importorskip("triton")

from fastbert.ops import gelu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AXES = {
    "hidden": (384, 768, 1023, 1024, 1536, 3072, 4096),
    "rows": (1, 3, 1000),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "approximate": ("none", "tanh"),
    "bias": ("x", "fp32", "none"),  # bias in x's dtype, fp32 bias, no bias
}
# Cost: elements; the interpreter evaluates erf one element at a time in Python (5x).
CASES = pairwise(AXES, cost=lambda c: c["rows"] * c["hidden"] * (5 if c["approximate"] == "none" else 1),
                 overhead=1e6)


def _case_id(c):
    return f"{c['rows']}x{c['hidden']}-{str(c['dtype'])[6:]}-{c['approximate']}-bias_{c['bias']}"


def _run(backend, case, cast, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, hidden, dtype = case["rows"], case["hidden"], case["dtype"]
    r = lambda *s: 2 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(rows, hidden).to(dtype).to(cast).to(DEV).requires_grad_()
    leaves = [x]
    bias = None
    if case["bias"] != "none":
        bdt = dtype if case["bias"] == "x" else torch.float32
        bias = (0.5 * r(hidden)).to(bdt).to(torch.float64 if cast == torch.float64 else bdt).to(DEV)
        leaves.append(bias.requires_grad_())
    dy = r(rows, hidden).to(dtype).to(cast).to(DEV)
    y = gelu(x, bias=bias, approximate=case["approximate"], backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)
    return dict(zip(("y", "dx", "dbias"), [y, *grads]))


def _check(case):
    got = _run("triton", case, case["dtype"])
    hi = _run("reference", case, torch.float64)
    lo = _run("reference", case, case["dtype"])
    for name in got:
        assert got[name].dtype == lo[name].dtype, name
        assert_close_to_ref(got[name].cpu(), hi[name].cpu(), lo[name].cpu(), name=name)


def test_grid_covers_every_pair():
    assert covers_every_pair(CASES, AXES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_pairwise(case, poison):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", full_product(AXES), ids=_case_id)
def test_parity_full(case, poison):
    _check(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_negative_tail_is_exact_erf_gelu(dtype, poison):
    """In [-6, -2] ``1 + erf(z / sqrt(2))`` cancels in fp32; the kernel's erfc tail must give the
    exact GELU rounded to the dtype (here every value, bar ties, equals the fp64 result rounded)."""
    x = torch.linspace(-6, -2, 1001, dtype=torch.float64).to(dtype)
    z = x.double()
    exact = z * 0.5 * torch.erfc(-z / math.sqrt(2.0))
    y = gelu(x[None].to(DEV), backend="triton")[0].cpu()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((y.double() - exact).abs() <= 0.5 * ulp + 1e-30).float().mean() > 0.99
    assert ((y.double() - exact).abs() <= ulp).all()
    assert torch.equal(y, exact.to(dtype)) or (y != exact.to(dtype)).sum() <= 2
    tanh = _exact(z, "tanh")
    yt = gelu(x[None].to(DEV), approximate="tanh", backend="triton")[0].cpu()
    assert ((yt.double() - tanh).abs() <= torch.finfo(dtype).eps * tanh.abs().clamp_min(torch.finfo(dtype).tiny)).all()
    # the gradient keeps its relative precision in the tail too
    xg = x.float()[None].to(DEV).requires_grad_()
    (dx,) = torch.autograd.grad(gelu(xg, backend="triton"), (xg,), torch.ones_like(xg))
    want = 0.5 * torch.erfc(-z / math.sqrt(2.0)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    assert ((dx[0].cpu().double() - want).abs() <= 1e-5 * want.abs()).all()


def _exact(z, approximate):
    """GELU in fp64 without the cancellation of ``1 + erf`` / ``1 + tanh`` (F.gelu returns 0 for
    z <= -10 even in fp64): ``z Phi(z) = z erfc(-z / sqrt 2) / 2`` and ``z sigmoid(2u)``."""
    if approximate == "tanh":
        return z * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))
    return z * 0.5 * torch.erfc(-z / math.sqrt(2.0))


def test_large_and_extreme_inputs(poison):
    x = torch.tensor([[-1e4, -60.0, -10.0, -1.0, -0.0, 0.0, 1e-8, 1.0, 10.0, 60.0, 1e4, 6e4]], dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for approximate in ("none", "tanh"):
            xd = x.to(dtype).to(DEV).requires_grad_()
            y = gelu(xd, approximate=approximate, backend="triton")
            (dx,) = torch.autograd.grad(y, (xd,), torch.ones_like(y))
            want = _exact(x.to(dtype).double(), approximate)
            assert torch.isfinite(y).all() and torch.isfinite(dx).all()
            # fp16/bf16: within one unit in the last place; fp32: a few (the erfc fit is 1.2e-7
            # relative, and exp(-z^2 / 2) carries the rounding of z^2 ~ 50 at z = -10)
            rtol = torch.finfo(dtype).eps * (8 if dtype == torch.float32 else 1)
            torch.testing.assert_close(y.cpu().double(), want.to(dtype).double(), rtol=rtol,
                                       atol=torch.finfo(dtype).tiny)


def test_dbias_is_deterministic():
    case = {"rows": 700, "hidden": 1023, "dtype": torch.float16, "approximate": "none", "bias": "fp32"}
    a, b = _run("triton", case, torch.float16), _run("triton", case, torch.float16)
    assert torch.equal(a["dbias"], b["dbias"]) and torch.equal(a["dx"], b["dx"])


def test_opcheck_and_compile():
    x = torch.randn(3, 24, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.gelu_fwd.default, (x, b, "none", "triton"))
    torch.library.opcheck(torch.ops.fastbert.gelu_fwd.default, (x, None, "tanh", "triton"))
    f = lambda x: gelu(x, bias=b, backend="triton")  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_strided_and_expanded_bias(poison):
    """Issue 12 item 2: a strided or stride-0 bias was read as contiguous memory (wrong values or
    NaN); the ops layer hands every backend a contiguous vector."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    dy = torch.randn(6, 40, generator=g, dtype=torch.float64)
    for base, view in ((torch.randn(80, generator=g, dtype=torch.float64), lambda t: t[::2]),
                       (torch.randn(1, generator=g, dtype=torch.float64), lambda t: t.expand(40))):
        out = []
        for backend, cast in (("triton", torch.float32), ("reference", torch.float64), ("reference", torch.float32)):
            xs, bs = x.to(DEV, cast).requires_grad_(), base.to(DEV, cast).requires_grad_()
            y = gelu(xs, bias=view(bs), backend=backend)
            out.append([y] + list(torch.autograd.grad(y, (xs, bs), dy.to(DEV, cast))))
        for name, got, hi, lo in zip(("y", "dx", "dbias"), *out):
            assert_close_to_ref(got.cpu(), hi.cpu(), lo.cpu(), name=name)
