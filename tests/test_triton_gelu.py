"""Triton GELU with bias through ``fastbert.ops.gelu(..., backend="triton")``: parity of y, dx and
dbias with the reference (STYLE.md's rule) on the one case list every backend runs (``_cases_gelu``)
plus many row tiles (``-m slow``: the full product of the axes below), the negative tail against
exact erf GELU, the tanh form, determinism and the custom-op check. Runs under ``TRITON_INTERPRET=1`` on CPU (conftest)."""

from __future__ import annotations

import math

import pytest
import torch
from _cases_gelu import GELU_CASES, GeluCase, check_gelu_case, gelu_inputs
from _pairwise import full_product
from _tolerance import assert_close_to_ref

pytest.importorskip("triton")

from fastbert.ops import gelu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The full product behind -m slow: widths on each side of the vector paths and column blocks,
# 1000 rows (many row tiles per backward program), every dtype, both forms, every bias dtype.
AXES = {
    "hidden": (384, 768, 1023, 1024, 1536, 3072, 4096),
    "rows": (1, 3, 1000),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "approximate": ("none", "tanh"),
    "bias": ("x", "fp32", "none"),  # bias in x's dtype, fp32 bias, no bias
}
# Triton-only: 600 rows of 1023, many row tiles (64-row tiles under the interpreter, 10 of them
# over 8 backward programs, the last partial).
TRITON_CASES = (GeluCase(600, 1023, torch.float16, "fp32", "tanh"),)


@pytest.mark.parametrize("case", GELU_CASES + TRITON_CASES, ids=str)
def test_triton_gelu_matches_reference(case, poison):
    check_gelu_case(case, "triton", DEV)


@pytest.mark.slow
@pytest.mark.parametrize("case", [GeluCase(**p) for p in full_product(AXES)], ids=str)
def test_parity_full(case, poison):
    check_gelu_case(case, "triton", DEV)


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
    t = gelu_inputs(GeluCase(700, 1023, torch.float16, "fp32", "none"))
    x, bias, dy = t["x"].half().to(DEV), t["bias"].float().to(DEV), t["dy"].half().to(DEV)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(), bias.clone().requires_grad_()]
        runs.append(torch.autograd.grad(gelu(leaves[0], bias=leaves[1], backend="triton"), leaves, dy))
    (dx_a, dbias_a), (dx_b, dbias_b) = runs
    assert torch.equal(dbias_a, dbias_b) and torch.equal(dx_a, dx_b)


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
