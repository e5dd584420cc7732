"""fastbert.ops.layer_norm: reference vs F.layer_norm, torch backend vs reference (the one case
list, ``_cases_layer_norm``: the add & norm fusion), dropout, edge values, validation, custom-op checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases_layer_norm import LAYER_NORM_CASES, check_layer_norm_case
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


@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=str)
def test_torch_backend_matches_reference(case, poison):
    check_layer_norm_case(case, "torch", "cpu")


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


# ---- issue 12: regressions (each failed before its fix) ----------------------------------------


def test_torch_backend_constant_rows_eps_1e_12_are_exact(poison):
    """Item 5: aten's one-pass statistics on a constant row gave y = 8 (not 0) and gradients of
    -8388608; the rows found ill-conditioned from mean / rstd are recomputed by the reference."""
    x = torch.full((2, 8), 154.125).half()
    x[1] = -x[1]
    assert torch.equal(layer_norm(x, eps=1e-12, backend="torch"), torch.zeros_like(x))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.full((1, 64), 100.0), torch.randn(3, 64, generator=g)])
    w, b = 1 + 0.1 * torch.randn(64, generator=g), torch.randn(64, generator=g)
    dy = torch.randn(4, 64, generator=g)
    out = {}
    for backend, dt in (("torch", torch.float32), ("reference", torch.float64), ("reference", torch.float32)):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, b)]
        y = layer_norm(*leaves, eps=1e-12, backend=backend)
        out[backend, dt] = [y] + list(torch.autograd.grad(y, leaves, dy.to(dt)))
    assert torch.equal(out["torch", torch.float32][0][0], b)  # the constant row returns bias
    for name, got, hi, lo in zip(("y", "dx", "dweight", "dbias"), *out.values()):
        assert_close_to_ref(got, hi, lo, name=name)


@pytest.mark.parametrize("ratio", [100.0, 3000.0])
def test_torch_backend_large_mean_rows_backward(ratio, poison):
    """Item 5: rows whose mean is ``ratio`` spreads away from 0 (aten's backward lost 2-5x the
    reference's fp32 error there) follow the tolerance rule in every gradient."""
    g = torch.Generator().manual_seed(1)
    x = ratio + torch.randn(6, 768, generator=g)
    w = torch.randn(768, generator=g)
    dy = torch.randn(6, 768, generator=g)
    out = []
    for backend, dt in (("torch", torch.float32), ("reference", torch.float64), ("reference", torch.float32)):
        xs, ws = x.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        y = layer_norm(xs, ws, eps=1e-12, backend=backend)
        out.append([y] + list(torch.autograd.grad(y, (xs, ws), dy.to(dt))))
    for name, got, hi, lo in zip(("y", "dx", "dweight"), *out):
        assert_close_to_ref(got, hi, lo, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["x,x", "fp32,x", "x,fp32", "none,none", "none,x"])
def test_torch_backend_takes_every_supported_param_dtype(dtype, params, poison):
    """Item 6: half x with half weight failed in backward ("expected scalar type Half but found
    Float"), fp32 weight with a half bias in forward ("mixed dtype (CPU)")."""
    x, w, b, _, _ = _inputs(5, 96, dtype, seed=3)
    pick = {"x": dtype, "fp32": torch.float32}
    wd, bd = params.split(",")
    dy = torch.randn(5, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def run(backend, cast):
        xs = x.to(cast).requires_grad_()
        ws = None if wd == "none" else w.to(torch.float64 if cast == torch.float64 else pick[wd]).requires_grad_()
        bs = None if bd == "none" else b.to(torch.float64 if cast == torch.float64 else pick[bd]).requires_grad_()
        leaves = [t for t in (xs, ws, bs) if t is not None]
        y = layer_norm(xs, ws, bs, eps=1e-12, backend=backend)
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(cast)))

    for got, hi, lo in zip(run("torch", dtype), run("reference", torch.float64), run("reference", dtype)):
        assert got.dtype == lo.dtype
        assert_close_to_ref(got, hi, lo)


def test_half_module_trains_on_cpu():
    """Item 6: ``model.to(torch.float16)`` training on CPU (fp16 weight and bias) failed in backward."""
    from fastbert.nn import LayerNorm

    ln = LayerNorm(32, eps=1e-12).to(torch.float16)
    x = torch.randn(4, 32, dtype=torch.float16, requires_grad=True)
    ln(x).float().square().sum().backward()
    assert ln.weight.grad.dtype == torch.float16 and torch.isfinite(ln.weight.grad).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_in_empty_out(backend):
    """Item 9: no rows, or hidden 0, gives an empty output and empty gradients."""
    for shape in ((0, 16), (3, 0), (2, 0, 5)):
        x = torch.randn(*shape, requires_grad=True)
        w = torch.randn(shape[-1], requires_grad=True)
        y = layer_norm(x, w, residual=torch.randn(*shape), backend=backend)
        assert y.shape == x.shape
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -1e-12])
def test_eps_rule_is_one_for_every_backend(eps):
    """Item 9: eps = inf was accepted by two backends and rejected by the third; the rule is the
    ops layer's: finite and >= 0 (0 is accepted, as by torch)."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"eps: expected a finite float >= 0, got"):
        layer_norm(x, eps=eps)
    torch.testing.assert_close(layer_norm(x, eps=0.0), F.layer_norm(x, (8,), eps=0.0))


def test_dtype_message_names_each_allowed_dtype_once():
    """Item 9: "expected dtype torch.float32 or torch.float32"."""
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32, got torch.float16$"):
        layer_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"x_bias: expected dtype torch.bfloat16 or torch.float32, got torch.float64"):
        layer_norm(torch.randn(2, 8).bfloat16(), x_bias=torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_and_expanded_parameters(backend, poison):
    """Item 2 (every backend): strided and stride-0 weight / bias / x_bias are read as their values."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    wb = torch.randn(128, generator=g, requires_grad=True)
    bb = torch.randn(1, generator=g, requires_grad=True)
    xbb = torch.randn(1, generator=g, requires_grad=True)
    views = lambda: (wb[::2], bb.expand(64), xbb.expand(64))  # noqa: E731
    y = layer_norm(x, *views()[:2], x_bias=views()[2], backend=backend)
    w, b, xb = (t.detach().contiguous() for t in views())
    torch.testing.assert_close(y, F.layer_norm(x.detach() + xb, (64,), w, b))
    dy = torch.rand(3, 64, generator=g)
    grads = torch.autograd.grad(y, (x, wb, bb, xbb), dy)
    ref = torch.autograd.grad(F.layer_norm(x + xbb.expand(64), (64,), wb[::2], bb.expand(64)), (x, wb, bb, xbb), dy)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", ["weight,bias", "bias", "weight"])
@pytest.mark.parametrize("shifted", [False, True])
def test_torch_backend_dbias_from_aten_pass(dtype, params, shifted, poison):
    """issue 16: dbias comes out of aten's backward pass (its output mask, a stand-in bias vector
    when there is no weight), on the direct and the centred path (``shifted``: one row's mean is 50
    spreads); every gradient follows the tolerance rule and an absent one stays None."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(33, 96, generator=g, dtype=torch.float64)
    if shifted:
        x[3] += 50.0
    w = 1 + 0.1 * torch.randn(96, generator=g, dtype=torch.float64)
    b = torch.randn(96, generator=g, dtype=torch.float64)
    dy = torch.randn(33, 96, generator=g, dtype=torch.float64)

    def run(backend, dt):
        xs = x.to(dt).requires_grad_()
        ws = w.to(dt).requires_grad_() if "weight" in params else None
        bs = b.to(dt).requires_grad_() if "bias" in params else None
        leaves = [t for t in (xs, ws, bs) if t is not None]
        y = layer_norm(xs, ws, bs, eps=1e-12, backend=backend)
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(dt)))

    got = run("torch", dtype)
    assert len(got) == 2 + params.count(",") + 1
    for t, hi, lo in zip(got, run("reference", torch.float64), run("reference", dtype)):
        assert t.dtype == lo.dtype and t.shape == lo.shape
        assert_close_to_ref(t, hi, lo)


def test_torch_backend_worst_ratio_is_max_abs_and_propagates_nan():
    """issue 16: the ill-conditioned-row check (now mul / aminmax) is ``max |mean| * rstd``, a
    negative mean counted by its size (at either end of the range), NaN wherever a row's statistics
    are NaN; the rows past a threshold are those :func:`_rows_above` finds (NaN rows are not)."""
    from fastbert.backends.torch.layer_norm import _rows_above, _worst_ratio

    mean = torch.tensor([0.5, -40.0, 3.0, 20.0])
    rstd = torch.tensor([1.0, 0.5, 1.0, 0.5])
    assert _worst_ratio(mean, rstd) == 20.0
    assert _worst_ratio(-mean, rstd) == 20.0
    assert _worst_ratio(mean[2:], rstd[2:]) == 10.0  # the maximum at the top end
    assert _worst_ratio(-mean[2:], rstd[2:]) == 10.0  # ... and at the bottom one
    assert _worst_ratio(mean.double(), rstd.double()) == 20.0
    assert _worst_ratio(mean.view(4, 1), rstd.view(4, 1)) == 20.0  # aten's (rows, 1) statistics
    assert _rows_above(mean, rstd, 16.0).tolist() == [1]
    assert _rows_above(mean, rstd, 2.0).tolist() == [1, 2, 3]
    assert _rows_above(mean, rstd, 20.0) is None
    for i in range(4):
        m = mean.clone()
        m[i] = float("nan")
        w = _worst_ratio(m, rstd)
        assert w != w
        assert _rows_above(m, rstd, 2.0).tolist() == [j for j in (1, 2, 3) if j != i]
    assert _worst_ratio(mean[:0], rstd[:0]) == 0.0


# ---- issue 16: the eager paths of an unfused call ----------------------------------------------


def _custom_op_vs_eager(fn, inputs):
    from _custom_op_path import output_and_grads

    dy_of = lambda y: torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)  # noqa: E731
    return output_and_grads(fn, inputs, dy_of, True), output_and_grads(fn, inputs, dy_of, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(33, 96), (2, 3, 40), (40,)])
def test_torch_backend_unfused_eager_gradients_equal_the_custom_op_bit_for_bit(dtype, shape, poison):
    """Well-conditioned rows: the eager call's y carries aten's own backward node, the very
    ``native_layer_norm_backward`` the custom op's backward makes there, so every output and gradient
    is the custom-op path's bit for bit (fp32 weight with fp64 x included)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)
    b = 0.1 * torch.randn(shape[-1], generator=g, dtype=dtype)
    for fn, inputs in ((lambda x, w, b: layer_norm(x, w, b, eps=1e-12, backend="torch"), (x, w.to(dtype), b)),
                       (lambda x, w: layer_norm(x, w, backend="torch"), (x, w)),
                       (lambda x: layer_norm(x, backend="torch"), (x,))):
        want, got = _custom_op_vs_eager(fn, inputs)
        assert type(fn(*(t.requires_grad_() for t in inputs)).grad_fn).__name__ == "NativeLayerNormBackward0"
        for a, c in zip(got, want, strict=True):
            assert a.dtype == c.dtype and a.shape == c.shape
            assert torch.equal(a, c)


@pytest.mark.parametrize("shift", [1.5, 8.0, 100.0])
def test_torch_backend_unfused_rows_past_the_backward_threshold_take_fastbert_s_node(shift, poison):
    """A row with |mean| * rstd > 1 (aten's backward loses accuracy there) takes fastbert's own node
    and its centred backward; > 16 also the recomputed forward. N-D x, one shifted row: outputs
    and gradients equal the custom-op path's and follow the tolerance rule against the reference."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 5, 64, generator=g)
    x[1, 2] += shift
    w = torch.randn(64, generator=g)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert type(layer_norm(xs, ws, eps=1e-12, backend="torch").grad_fn).__name__ == "_EagerFunctionBackward"
    want, got = _custom_op_vs_eager(lambda x, w: layer_norm(x, w, eps=1e-12, backend="torch"), (x, w))
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    dy = torch.linspace(-1, 1, x.numel()).view(x.shape)
    refs = []
    for dt in (torch.float64, torch.float32):
        leaves = [t.to(dt).requires_grad_() for t in (x, w)]
        y = layer_norm(*leaves, eps=1e-12, backend="reference")
        refs.append([y, *torch.autograd.grad(y, leaves, dy.to(dt))])
    for name, t, hi, lo in zip(("y", "dx", "dweight"), got, *refs):
        assert_close_to_ref(t, hi, lo, name=name)


def test_torch_backend_unfused_no_grad_recomputes_ill_conditioned_rows_of_nd_x():
    """Without gradients an unfused N-D call runs the functional forward on x as it is: an
    ill-conditioned row (a constant one, with eps 1e-12) still returns exactly bias."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 32, generator=g)
    x[1, 1] = 100.0
    b = torch.randn(32, generator=g)
    with torch.no_grad():
        y = layer_norm(x, None, b, eps=1e-12, backend="torch")
    assert y.shape == x.shape and torch.equal(y[1, 1], b)
    torch.testing.assert_close(y[0], F.layer_norm(x[0], (32,), None, b, eps=1e-12))


def test_torch_backend_backward_reads_the_forward_s_worst_ratio():
    """The forward's max |mean| * rstd rides on rstd to the backward (no second measure); statistics
    without it are measured, and NaN statistics take the centred form."""
    from fastbert.backends.torch import layer_norm as tln

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(24))  # seeded: well conditioned
    _, mean, rstd, _ = tln.layer_norm_fwd_functional(x, None, None, None, None, eps=1e-5, dropout_p=0.0,
                                                     seed=None, fused=False)
    assert getattr(rstd, tln._WORST) == tln._worst_ratio(mean, rstd)
    assert tln._aten_form_is_stable(mean, rstd)
    setattr(rstd, tln._WORST, 2.0)  # the hint is what the backward reads
    assert not tln._aten_form_is_stable(mean, rstd)
    assert tln._aten_form_is_stable(mean.clone(), rstd.clone())  # no hint: measured
    assert not tln._aten_form_is_stable(mean.clone().fill_(float("nan")), rstd.clone())


# ---- issue 16: the eager paths of an add & norm ------------------------------------------------


def _add_norm_inputs(shape, dtype, params_fp32, seed, shift=None):
    """x, weight, bias, residual, x_bias (fresh random values; ``shift``: (row index, offset) added to
    one row of x, which makes it ill-conditioned for large offsets)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden = shape[-1]
    pdt = torch.float32 if params_fp32 else dtype
    x, res = r(*shape).to(dtype), r(*shape).to(dtype)
    if shift is not None:
        x.view(-1, hidden)[shift[0]] += shift[1]
    return x, (1 + 0.1 * r(hidden)).to(pdt), (0.1 * r(hidden)).to(pdt), res, (0.1 * r(hidden)).to(pdt)


def _add_norm_fn(fusion, dropout_p=0.0):
    """ops.layer_norm on the torch backend taking (x, weight, bias[, residual][, x_bias])."""
    def fn(x, w, b, *rest):
        res = rest[0] if fusion in ("residual", "both") else None
        xb = rest[-1] if fusion in ("x_bias", "both") else None
        return layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, dropout_p=dropout_p, backend="torch")
    return fn


def _fusion_inputs(inputs, fusion):
    x, w, b, res, xb = inputs
    return {"residual": (x, w, b, res), "x_bias": (x, w, b, xb), "both": (x, w, b, res, xb)}[fusion]


def _reference_outputs(fn_inputs, fusion, dy):
    """[y, *grads] of the reference backend in fp64 and in the inputs' dtype."""
    out = []
    for dt in (torch.float64, fn_inputs[0].dtype):
        leaves = [t.to(torch.float64 if dt == torch.float64 else t.dtype).requires_grad_() for t in fn_inputs]
        x, w, b, *rest = leaves
        res = rest[0] if fusion in ("residual", "both") else None
        xb = rest[-1] if fusion in ("x_bias", "both") else None
        y = layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, backend="reference")
        out.append([y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))])
    return out


@pytest.mark.parametrize("dtype,params_fp32", [(torch.float32, True), (torch.float64, False), (torch.float64, True)])
@pytest.mark.parametrize("shape", [(33, 96), (2, 3, 40)])
@pytest.mark.parametrize("fusion", ["residual", "x_bias", "both"])
def test_torch_backend_add_norm_eager_records_aten_s_graph(dtype, params_fp32, shape, fusion, poison):
    """Without dropout, well-conditioned rows: the eager add & norm with gradients records aten's own
    graph (the adds, then native_layer_norm: no Python node), whose y and gradients (x, weight, bias,
    residual, x_bias; fp32 parameters with fp64 x too) equal the custom-op path's bit for bit and follow
    the tolerance rule against the fp64 reference; without gradients y is the custom op's as well."""
    inputs = _fusion_inputs(_add_norm_inputs(shape, dtype, params_fp32, seed=31), fusion)
    fn = _add_norm_fn(fusion)
    y = fn(*(t.clone().requires_grad_() for t in inputs))
    assert type(y.grad_fn).__name__ == "NativeLayerNormBackward0"
    assert y.shape == inputs[0].shape and y.dtype == dtype
    want, got = _custom_op_vs_eager(fn, inputs)
    for a, c in zip(got, want, strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(fn(*inputs), want[0])
    dy = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
    for i, (t, hi, lo) in enumerate(zip(got, *_reference_outputs(inputs, fusion, dy), strict=True)):
        assert_close_to_ref(t, hi, lo, name=f"output {i}")


@pytest.mark.parametrize("shift", [(5, 3.0), (5, 1e4), (0, "constant"), (5, "fp64 spread 1e-2")])
@pytest.mark.parametrize("fusion", ["residual", "both"])
def test_torch_backend_add_norm_ill_conditioned_rows(shift, fusion, poison):
    """Rows past the backward's threshold (|mean| * rstd > 1) take fastbert's node; rows of mean 1e4
    and spread ~1 (|mean| * rstd ~ 1e4; fp64: spread 1e-2, ~1e6) and a constant row (residual and
    x_bias cancelling x) also its recomputed forward, with and without gradients: outputs and
    gradients equal the custom-op path's and follow the tolerance rule against the fp64 reference;
    the constant row returns bias."""
    row, offset = shift
    dtype = torch.float64 if offset == "fp64 spread 1e-2" else torch.float32
    x, w, b, res, xb = _add_norm_inputs((2, 6, 64), dtype, dtype == torch.float32, seed=32,
                                        shift=shift if isinstance(offset, float) else None)
    if dtype == torch.float64:
        x.view(-1, 64)[row] = 1e4 + 1e-2 * x.view(-1, 64)[row]
        res.view(-1, 64)[row] *= 1e-2
    if offset == "constant":  # h = (x + x_bias) + residual = 7 exactly in row 0 (dyadic x_bias)
        xb = torch.randint(-8, 8, (64,), generator=torch.Generator().manual_seed(3)) / 8.0
        x.view(-1, 64)[0] = 7.0 - (xb if fusion == "both" else 0.0)
        res.view(-1, 64)[0] = 0.0
    inputs = _fusion_inputs((x, w, b, res, xb), fusion)
    fn = _add_norm_fn(fusion)
    assert type(fn(*(t.clone().requires_grad_() for t in inputs)).grad_fn).__name__ == "_EagerFunctionBackward"
    want, got = _custom_op_vs_eager(fn, inputs)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)
    with torch.no_grad():
        y = fn(*inputs)
    assert torch.equal(y, want[0])
    if offset == "constant":
        assert torch.equal(y.view(-1, 64)[0], b)
    dy = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
    names = ("y", "dx", "dweight", "dbias", "dresidual", "dx_bias")
    for name, t, hi, lo in zip(names, got, *_reference_outputs(inputs, fusion, dy)):
        assert_close_to_ref(t, hi, lo, name=name)


def test_torch_backend_add_norm_ill_conditioned_rows_no_grad_nd():
    """Without gradients the add & norm recomputes the ill-conditioned rows of an N-D call in place
    by the reference's math: rows of mean 1e4 and spread 1 and a constant pre-norm row (eps 1e-12,
    which returns exactly bias) are the reference's bit for bit, the well-conditioned rows aten's;
    y follows the tolerance rule."""
    g = torch.Generator().manual_seed(33)
    x = torch.randn(3, 4, 128, generator=g)
    res = torch.randn(3, 4, 128, generator=g)
    xb = torch.randint(-8, 8, (128,), generator=g) / 8.0  # dyadic: (7 - xb) + xb is 7 exactly
    x[1] = 1e4 + x[1]
    x[2, 3], res[2, 3] = 7.0 - xb, 0.0
    w, b = 1 + 0.1 * torch.randn(128, generator=g), 0.1 * torch.randn(128, generator=g)
    with torch.no_grad():
        y = layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, backend="torch")
        hi = layer_norm(x.double(), w, b, eps=1e-12, residual=res.double(), x_bias=xb.double(), backend="reference")
        lo = layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, backend="reference")
        aten = F.layer_norm(x + xb + res, (128,), w, b, eps=1e-12)
    assert y.shape == x.shape
    assert_close_to_ref(y, hi, lo)
    assert torch.equal(y[2, 3], b)
    assert torch.equal(y[1], lo[1]) and torch.equal(y[2, 3], lo[2, 3])
    assert not torch.equal(aten[1], lo[1])  # what the recomputation changed
    assert torch.equal(y[0], aten[0]) and torch.equal(y[2, :3], aten[2, :3])
    # A NaN row makes the worst ratio NaN: the other rows are then looked at one by one, and the
    # ill-conditioned ones are still recomputed (a "worst > threshold" test would skip them).
    x[0, 0] = float("nan")
    with torch.no_grad():
        y = layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb, backend="torch")
    assert bool(y[0, 0].isnan().all()) and not bool(y[0, 1:].isnan().any())
    assert torch.equal(y[1], lo[1]) and torch.equal(y[2, 3], b)


def test_torch_backend_add_norm_with_dropout_keeps_fastbert_s_node():
    """With dropout the eager add & norm keeps fastbert's node, which saves the seed (no
    ``[rows, hidden]`` keep mask), and its mask is the shared Philox one: y equals the reference's
    under the same seed."""
    x, w, b, res, xb = (t.requires_grad_() for t in _add_norm_inputs((8, 64), torch.float32, True, seed=34))
    torch.manual_seed(5)
    y = layer_norm(x, w, b, residual=res, x_bias=xb, dropout_p=0.25, backend="torch")
    assert type(y.grad_fn).__name__ == "_EagerFunctionBackward"
    saved = y.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved if t is not None) <= x.numel() + 2 * 64 + 2 * 8 + 2  # h, w, mean, rstd, seed
    torch.manual_seed(5)
    ref = layer_norm(x, w, b, residual=res, x_bias=xb, dropout_p=0.25, backend="reference")
    assert_close_to_ref(y, ref.double(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half_add_norm_stays_on_its_path(dtype, poison):
    """fp16/bf16 add & norm keeps its fp32 pre-norm sum, rounded once (no aten graph of that form):
    fastbert's node with gradients, the custom op's forward without, bit for bit."""
    inputs = _fusion_inputs(_add_norm_inputs((2, 5, 96), dtype, True, seed=35), "both")
    fn = _add_norm_fn("both")
    assert type(fn(*(t.clone().requires_grad_() for t in inputs)).grad_fn).__name__ == "_EagerFunctionBackward"
    want, got = _custom_op_vs_eager(fn, inputs)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(fn(*inputs), want[0])


@pytest.mark.parametrize("shift", [None, (3, 1e4)])
@pytest.mark.parametrize("fusion", ["none", "both"])
def test_torch_backend_eager_paths_under_copying_saved_tensor_hooks(shift, fusion, poison):
    """A saved-tensor hook that copies what autograd saves (offloading does) changes no gradient, on
    aten's graph and on fastbert's node alike (the forward's worst-ratio hint does not survive the
    copy: the backward measures again)."""
    x, w, b, res, xb = _add_norm_inputs((2, 6, 64), torch.float32, True, seed=36, shift=shift)
    inputs = (x, w, b) if fusion == "none" else (x, w, b, res, xb)
    fn = (lambda x, w, b: layer_norm(x, w, b, eps=1e-12, backend="torch")) if fusion == "none" else _add_norm_fn(fusion)
    dy_of = lambda y: torch.linspace(-1, 1, y.numel()).view(y.shape)  # noqa: E731
    from _custom_op_path import output_and_grads

    want = output_and_grads(fn, inputs, dy_of, False)
    copies = []

    def pack(t):
        copies.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = output_and_grads(fn, inputs, dy_of, False)
    assert copies  # the hook saw the saved tensors
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)


def test_compiled_add_norm_gradients_match_eager():
    """torch.compile traces the custom op (its registered autograd): y and every gradient of the
    compiled add & norm match the eager call, which records aten's graph."""
    inputs = _fusion_inputs(_add_norm_inputs((4, 32), torch.float32, True, seed=37), "both")
    fn = _add_norm_fn("both")
    dy_of = lambda y: torch.linspace(-1, 1, y.numel()).view(y.shape)  # noqa: E731
    from _custom_op_path import output_and_grads

    eager = output_and_grads(fn, inputs, dy_of, False)
    compiled = output_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs, dy_of, False)
    for a, c in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
