"""fastbert.ops.geglu: reference vs an independent composite, torch backend vs the fp64 reference
(forward and gradients, poisoned outputs), awkward sizes, validation, opcheck / compile / autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_ref

from fastbert.ops import geglu

CPU_BACKENDS = ("reference", "torch")


def _composite(x, b, approximate):
    """The unfused sequence ModernBERT's MLP runs: chunk, GELU, multiply (torch autograd)."""
    z = x if b is None else x + b
    a, g = z.chunk(2, dim=-1)
    return F.gelu(a, approximate=approximate) * g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp64_matches_composite_and_gradcheck(backend, approximate, poison):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 34, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(34, generator=g, dtype=torch.float64, requires_grad=True)
    y = geglu(x, bias=b, approximate=approximate, backend=backend)
    ref = _composite(x, b, approximate)
    assert y.shape == (4, 3, 17)
    torch.testing.assert_close(y, ref, atol=1e-14, rtol=1e-13)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, b], dy), torch.autograd.grad(ref, [x, b], dy)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    small = (x[:2, 0, :6].detach().requires_grad_(), b[:6].detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, b: geglu(x, bias=b, approximate=approximate, backend=backend), small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,width,approximate,with_bias", [
    (1, 2304, "none", True), (7, 2046, "tanh", True), (3, 2, "none", False), (5, 194, "tanh", False)])
def test_torch_backend_matches_reference(dtype, rows, width, approximate, with_bias, poison):
    g = torch.Generator().manual_seed(rows * width)
    x = (2 * torch.randn(rows, width, generator=g, dtype=torch.float64)).to(dtype)
    b = torch.randn(width, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    dy = torch.randn(rows, width // 2, generator=g, dtype=torch.float64)

    def run(backend, cast):
        xs = x.detach().to(cast).requires_grad_()
        bs = b.detach().to(cast).requires_grad_() if with_bias else None
        y = geglu(xs, bias=bs, approximate=approximate, backend=backend)
        return [y] + list(torch.autograd.grad(y, [xs] + ([bs] if with_bias else []), dy.to(cast)))

    for name, o, h, lo in zip(["y", "dx", "dbias"], run("torch", dtype), run("reference", torch.float64),
                              run("reference", dtype)):
        assert_close_to_ref(o, h, lo, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_input_fp32_bias_and_empty(backend, poison):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, generator=g, requires_grad=True)
    x = base[:, :20]  # a non-contiguous view
    b = torch.randn(20, generator=g, requires_grad=True)
    y = geglu(x, bias=b, backend=backend)
    ref = _composite(x, b, "none")
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [base, b], dy), torch.autograd.grad(ref, [base, b], dy)):
        torch.testing.assert_close(got, want)
    xh = torch.randn(3, 8, dtype=torch.float16)
    bf = torch.randn(8)  # an fp32 bias beside fp16 x: read in fp32
    torch.testing.assert_close(geglu(xh, bias=bf, backend=backend).float(), _composite(xh.float(), bf, "none"),
                               atol=2e-3, rtol=2e-3)
    for shape in ((3, 0), (0, 8), (2, 0, 4)):
        xe = torch.randn(*shape, requires_grad=True)
        be = torch.randn(shape[-1], requires_grad=True)
        ye = geglu(xe, bias=be, backend=backend)
        assert ye.shape == shape[:-1] + (shape[-1] // 2,)
        dxe, dbe = torch.autograd.grad(ye.sum(), (xe, be))
        assert dxe.shape == xe.shape and torch.equal(dbe, torch.zeros_like(be))


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x: expected an even last dim"):
        geglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match="approximate: expected one of"):
        geglu(x, approximate="fast")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(4,\)"):
        geglu(x, bias=torch.zeros(4))
    with pytest.raises(TypeError, match="x: expected dtype"):
        geglu(x.int())
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        geglu([1.0, 2.0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_compile_autocast(backend):
    x = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.geglu_fwd.default, (x, b, "none", backend))
    dy = torch.randn(3, 8)
    act = torch.ops.fastbert.geglu_fwd(x.detach(), b.detach(), "tanh", backend)[1]  # (0,) where not kept
    torch.library.opcheck(torch.ops.fastbert.geglu_bwd.default,
                          (dy, x.detach(), b.detach(), act, True, "tanh", backend))
    f = lambda x: geglu(x, bias=b, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert geglu(x, bias=b, backend=backend).dtype == torch.bfloat16
