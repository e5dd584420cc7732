"""fastbert.ops.gelu: reference vs F.gelu, torch backend vs reference, edge values, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_ref

from fastbert.ops import gelu

CPU_BACKENDS = ("reference", "torch")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_matches_f_gelu_and_gradcheck(approximate):
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, dtype=torch.float64, requires_grad=True)
    y = gelu(x, bias=b, approximate=approximate, backend="reference")
    ref = F.gelu(x + b, approximate=approximate)
    torch.testing.assert_close(y, ref, atol=1e-14, rtol=1e-13)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, [x, b], dy), torch.autograd.grad(ref, [x, b], dy)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x, b: gelu(x, bias=b, approximate=approximate, backend="reference"),
                                    (x[:2, :4].detach().requires_grad_(), b[:4].detach().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden,approximate,with_bias", [
    (1, 384, "none", True), (7, 1023, "tanh", True), (3, 3072, "none", False), (5, 96, "tanh", False)])
def test_torch_backend_matches_reference(dtype, rows, hidden, approximate, with_bias, poison):
    g = torch.Generator().manual_seed(rows * hidden)
    x = (2 * torch.randn(rows, hidden, generator=g, dtype=torch.float64)).to(dtype)
    b = torch.randn(hidden, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    dy = torch.randn(rows, hidden, generator=g, dtype=torch.float64)

    def run(backend, cast):
        xs = x.detach().to(cast).requires_grad_()
        bs = b.detach().to(cast).requires_grad_() if with_bias else None
        y = gelu(xs, bias=bs, approximate=approximate, backend=backend)
        return [y] + list(torch.autograd.grad(y, [xs] + ([bs] if with_bias else []), dy.to(cast)))

    for name, o, h, l in zip(["y", "dx", "dbias"], run("torch", dtype), run("reference", torch.float64),
                             run("reference", dtype)):
        assert_close_to_ref(o, h, l, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_tail_is_exact_erf_gelu(dtype, backend):
    x = torch.linspace(-6, -2, 1001).to(dtype)
    exact = (x.double() * 0.5 * (1 + torch.erf(x.double() / 2**0.5))).to(dtype)
    # within one unit in the last place of the dtype (fp32 math rounded once to the dtype)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(gelu(x[None], backend=backend)[0], exact, atol=tiny, rtol=torch.finfo(dtype).eps)
    tanh = F.gelu(x.double(), approximate="tanh").to(dtype)
    torch.testing.assert_close(gelu(x[None], approximate="tanh", backend=backend)[0], tanh, atol=0, rtol=2**-7)


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="approximate: expected one of"):
        gelu(x, approximate="fast")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(3,\)"):
        gelu(x, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="x: expected dtype"):
        gelu(x.int())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_compile_autocast(backend):
    x = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.gelu_fwd.default, (x, b, "none", backend))
    f = lambda x: gelu(x, bias=b, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gelu(x, bias=b, backend=backend).dtype == torch.bfloat16
