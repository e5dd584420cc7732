"""Triton GeGLU with bias through ``fastbert.ops.geglu(..., backend="triton")``: parity of y, dx and
dbias with the fp64 reference (STYLE.md's rule; outputs and workspaces poisoned), exact erf and tanh,
bias in x's dtype / fp32 / none, awkward widths (n = 1, 97, 1023: non-powers of 2, a column block
that is partly masked), rows 1 to 130; ``dx`` aliasing ``x`` at the backend entry point, the
deterministic dbias, empty inputs and the custom-op checks. Runs under ``TRITON_INTERPRET=1`` on
CPU (conftest); no ``tl.dot``, so bf16 is checked like the other dtypes."""

from __future__ import annotations

import pytest
import torch
from _cases import check_rounded_runs
from _pairwise import pairwise, parity_tests

pytest.importorskip("triton")

from fastbert.backends.triton import geglu as tgeglu  # noqa: E402
from fastbert.ops import geglu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AXES = {
    "n": (1, 97, 1023, 1152),  # half width: y is [rows, n], x is [rows, 2n]
    "rows": (1, 3, 130),
    "dtype": (torch.float32, torch.float16, torch.bfloat16),
    "approximate": ("none", "tanh"),
    "bias": ("x", "fp32", "none"),
}
# Cost: elements; the interpreter evaluates erf one element at a time in Python (5x).
CASES = pairwise(AXES, cost=lambda c: c["rows"] * c["n"] * (5 if c["approximate"] == "none" else 1),
                 overhead=3e4)


def _case_id(c):
    return f"{c['rows']}x2*{c['n']}-{str(c['dtype'])[6:]}-{c['approximate']}-bias_{c['bias']}"


def _run(backend, case, cast, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, width, dtype = case["rows"], 2 * case["n"], case["dtype"]
    r = lambda *s: 2 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(rows, width).to(dtype).to(cast).to(DEV).requires_grad_()
    leaves, bias = [x], None
    if case["bias"] != "none":
        bdt = dtype if case["bias"] == "x" else torch.float32
        bias = (0.5 * r(width)).to(bdt).to(torch.float64 if cast == torch.float64 else bdt).to(DEV)
        leaves.append(bias.requires_grad_())
    dy = r(rows, width // 2).to(dtype).to(cast).to(DEV)
    y = geglu(x, bias=bias, approximate=case["approximate"], backend=backend)
    grads = torch.autograd.grad(y, leaves, dy)
    return dict(zip(("y", "dx", "dbias"), [y, *grads]))


def _check(case):
    check_rounded_runs(lambda backend, cast: _run(backend, case, cast), "triton", case["dtype"])


test_grid_covers_every_pair, test_parity_pairwise, test_parity_full = parity_tests(CASES, AXES, _check, _case_id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dx_may_alias_x(dtype, poison):
    """The backend entry point writes dx into x's own storage correctly (each program reads what it
    overwrites first), and dbias is deterministic."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 2 * 97, generator=g).to(dtype).to(DEV)
    b = torch.randn(2 * 97, generator=g).to(DEV)
    dy = torch.randn(37, 97, generator=g).to(dtype).to(DEV)
    dx, db = torch.full_like(x, float("nan")), torch.full((2 * 97,), float("nan"), device=DEV)
    tgeglu.geglu_bwd(dy, x, b, dx, db, approximate="none")
    x2, db2 = x.clone(), torch.full_like(db, float("nan"))
    tgeglu.geglu_bwd(dy, x2, b, x2, db2, approximate="none")
    assert torch.equal(x2, dx) and torch.equal(db2, db)


def test_empty_inputs():
    for shape in ((3, 0), (0, 8), (2, 0, 4)):
        x = torch.randn(*shape, device=DEV, requires_grad=True)
        b = torch.randn(shape[-1], device=DEV, requires_grad=True)
        y = geglu(x, bias=b, backend="triton")
        assert y.shape == shape[:-1] + (shape[-1] // 2,)
        dx, db = torch.autograd.grad(y.sum(), (x, b), allow_unused=True)
        assert dx.shape == x.shape and (db is None or torch.equal(db, torch.zeros_like(b)))


@pytest.mark.slow  # the custom op's opcheck / compile run by default on the torch backend (test_rotary / test_geglu)
def test_opcheck_and_compile():
    x = torch.randn(3, 24, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.geglu_fwd.default, (x, b, "none", "triton"))
    f = lambda x: geglu(x, bias=b, approximate="tanh", backend="triton")  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), atol=0, rtol=0)
