"""fastbert.ops.layer_norm: reference vs F.layer_norm, torch backend vs reference, the add & norm
fusion, dropout, edge values, validation, custom-op checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_ref

from fastbert.ops import layer_norm

CPU_BACKENDS = ("reference", "torch")


def _inputs(rows, hidden, dtype, seed=0, fused=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(rows, hidden).to(dtype)
    w = (1 + 0.1 * r(hidden)).float()
    b = (0.1 * r(hidden)).float()
    res = r(rows, hidden).to(dtype) if fused else None
    xb = (0.1 * r(hidden)).to(dtype) if fused else None
    return x, w, b, res, xb


@pytest.mark.parametrize("hidden", [384, 768, 1023])
@pytest.mark.parametrize("rows", [1, 7])
def test_reference_matches_f_layer_norm(hidden, rows):
    x, w, b, res, xb = _inputs(rows, hidden, torch.float64)
    w, b = w.double(), b.double()
    leaves = [t.requires_grad_() for t in (x, w, b, res, xb)]
    y = layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, backend="reference")
    ref = F.layer_norm(x + xb + res, (hidden,), w, b, eps=1e-12)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_reference_gradcheck_fp64_with_dropout():
    x, w, b, res, xb = (t.double().requires_grad_() for t in _inputs(3, 10, torch.float64))

    def f(x, w, b, res, xb):
        torch.manual_seed(4)
        return layer_norm(x, w, b, residual=res, x_bias=xb, dropout_p=0.3, backend="reference")

    assert torch.autograd.gradcheck(f, (x, w, b, res, xb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,rows,fusion", [
    (384, 1, "none"), (768, 3, "residual"), (1023, 17, "x_bias"), (1536, 3, "all"),
    (1024, 5, "dropout"), (4096, 2, "all")])
def test_torch_backend_matches_reference(dtype, hidden, rows, fusion, poison):
    x, w, b, res, xb = _inputs(rows, hidden, dtype, seed=hidden)
    kw = {}
    if fusion in ("residual", "all"):
        kw["residual"] = res
    if fusion in ("x_bias", "all"):
        kw["x_bias"] = xb
    if fusion in ("dropout", "all"):
        kw["dropout_p"] = 0.1
    names = ["x", "weight", "bias"] + [n for n in ("residual", "x_bias") if n in kw]

    def run(backend, cast):
        leaves = [t.detach().to(cast if t.dtype == dtype else t.dtype).requires_grad_()
                  for t in [x, w, b] + [kw[n] for n in names[3:]]]
        extra = dict(zip(names[3:], leaves[3:]))
        torch.manual_seed(11)
        y = layer_norm(leaves[0], leaves[1], leaves[2], eps=1e-12,
                       dropout_p=kw.get("dropout_p", 0.0), backend=backend, **extra)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(cast)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    got = run("torch", dtype)
    hi = run("reference", torch.float64)
    lo = run("reference", dtype)
    for name, g, h, l in zip(["y"] + ["d" + n for n in names], got, hi, lo):
        assert_close_to_ref(g, h, l, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_mean_unit_spread(backend):
    x = 2000.0 + torch.randn(4, 768)
    y = layer_norm(x, backend=backend)
    ref = F.layer_norm(x.double(), (768,)).float()
    assert (y - ref).abs().max() < 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_zero_fp16_row_returns_bias_like_torch(backend):
    x = torch.zeros(2, 64, dtype=torch.float16, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = layer_norm(x, w, b, eps=1e-12, backend=backend)
    assert torch.equal(y, b.detach().half().expand(2, 64))
    grads = torch.autograd.grad(y.float().sum(), [x, w, b])
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(xr, (64,), wr, br, eps=1e-12)
    ref_grads = torch.autograd.grad(ref.float().sum(), [xr, wr, br])
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() == torch.isfinite(r).all()
        torch.testing.assert_close(g.float(), r.float(), equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_matches_reference_and_is_seeded(backend):
    x, w, b, res, xb = _inputs(6, 96, torch.float64)
    torch.manual_seed(1)
    a = layer_norm(x, w.double(), b.double(), residual=res, x_bias=xb, dropout_p=0.4, backend=backend)
    torch.manual_seed(1)
    r = layer_norm(x, w.double(), b.double(), residual=res, x_bias=xb, dropout_p=0.4, backend="reference")
    torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)
    torch.manual_seed(2)
    assert not torch.equal(a, layer_norm(x, w.double(), b.double(), residual=res, x_bias=xb, dropout_p=0.4,
                                         backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_weight_no_bias_and_leading_dims(backend):
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(layer_norm(x, backend=backend), F.layer_norm(x, (40,)))


def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got \(7,\)"):
        layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual: expected x's shape"):
        layer_norm(x, residual=torch.randn(4, 7))
    with pytest.raises(TypeError, match="residual: expected x's dtype"):
        layer_norm(x, residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer_norm(x.long())
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        layer_norm(x, dropout_p=-0.1)
    with pytest.raises(TypeError, match="bias: expected dtype"):
        layer_norm(x.half(), None, torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, w, b, res, xb = (t.requires_grad_() for t in _inputs(3, 16, torch.float32))
    torch.library.opcheck(torch.ops.fastbert.layer_norm_fwd.default,
                          (x, w, b, res, xb, torch.tensor([3, 4]), 1e-5, 0.2, backend))
    torch.library.opcheck(torch.ops.fastbert.layer_norm_fwd.default,
                          (x, None, None, None, None, None, 1e-5, 0.0, backend))


def test_compile_and_autocast():
    x, w, b, res, xb = _inputs(3, 16, torch.float32)
    f = lambda x, r: layer_norm(x, w, b, residual=r, x_bias=xb)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, res), f(x, res))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(x.bfloat16(), w, b, residual=res)
    assert y.dtype == torch.bfloat16
