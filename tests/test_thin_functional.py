"""The torch backend's functional entry points (outputs returned, not written into ``out=`` buffers)
and GeGLU's saved activation (issue 16's thin ops, issue 17's GeGLU regression).

``fastbert.ops`` calls ``layer_norm_fwd/bwd_functional`` and ``gelu_fwd/bwd_functional`` where the
backend module has them: these tests check that path against the fp64 reference (poisoned
outputs on, so any buffer the ops layer still allocates and a backend skips fails), the
ill-conditioned-row guard on it, that the gradient it shares between ``x`` and ``residual`` does
not couple the two ``.grad`` tensors, and that the eager path and the custom-op path (what
``torch.compile`` traces) agree, forward and backward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _custom_op_path import Passthrough, output_and_grads
from _tolerance import assert_close_to_ref

import fastbert.backends.torch.gelu as torch_gelu
import fastbert.ops as ops


def _grads(fn, leaves, dy_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_functional_path_matches_reference(dtype, fused, poison):
    g = torch.Generator().manual_seed(7)
    rows, hidden = 9, 96
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    x[2] += 300.0  # ill-conditioned rows (|mean| * rstd >> 16): the guard recomputes them
    x[5] = 7.0 + 1e-3 * x[5]
    w, b = torch.randn(hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g, dtype=torch.float64)
    res, xb = torch.randn(rows, hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g,
                                                                                      dtype=torch.float64)
    leaves = [x, w, b] + ([res, xb] if fused else [])

    def run(backend, cast):
        def fn(x, w, b, *rest):
            kw = dict(residual=rest[0], x_bias=rest[1]) if rest else {}
            return ops.layer_norm(x, w, b, eps=1e-12, backend=backend, **kw)
        return _grads(fn, [t.to(cast) if t.dim() == 2 else t.float() for t in leaves])

    names = ["y", "dx", "dweight", "dbias", "dresidual", "dx_bias"]
    for name, o, hi, lo in zip(names, run("torch", dtype), run("reference", torch.float64), run("reference", dtype)):
        assert_close_to_ref(o, hi, lo, name=name)


def test_layer_norm_shared_gradient_does_not_couple_leaves():
    """Without dropout dx and dresidual are one tensor on the eager path; autograd must still give
    x and residual gradients that do not alias (an in-place update of one leaves the other)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    res = torch.randn(4, 32, generator=g, requires_grad=True)
    ops.layer_norm(x, residual=res).pow(2).sum().backward()
    ref = x.grad.clone()
    torch.testing.assert_close(res.grad, ref)
    x.grad.add_(1.0)
    torch.testing.assert_close(res.grad, ref)
    # a second backward accumulates into both, independently
    ops.layer_norm(x, residual=res).pow(2).sum().backward()
    torch.testing.assert_close(res.grad, 2 * ref)


@pytest.mark.parametrize("op", ["layer_norm", "gelu", "geglu"])
def test_eager_and_custom_op_paths_agree(op):
    """Eager (the functional entry points, a gradient shared by x and residual), eager with
    ``create_graph=True`` (backward through the backward's custom op) and the custom-op path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    b = torch.randn(24, generator=g, dtype=torch.float64)
    res = torch.randn(5, 24, generator=g, dtype=torch.float64)
    fns = {"layer_norm": (lambda x, b, r: ops.layer_norm(x, b, b, residual=r, x_bias=b), (x, b, res)),
           "gelu": (lambda x, b: ops.gelu(x, bias=b, approximate="tanh"), (x, b)),
           "geglu": (lambda x, b: ops.geglu(x, bias=b), (x, b))}
    fn, inputs = fns[op]

    def run(traced, create_graph):
        return output_and_grads(fn, inputs, lambda y: torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape),
                                traced, create_graph)

    want = run(True, False)
    for got in (run(False, False), run(False, True)):
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "custom_op"])  # eager: aten's graph
@pytest.mark.parametrize("with_bias", [False, True])
def test_geglu_backward_uses_the_saved_activation(with_bias, traced, monkeypatch, poison):
    """fp32 on the torch backend: backward multiplies by the forward's gelu(a) instead of
    recomputing it (the 0.91x regression of the unfused sequence), and stays equal to it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if with_bias else None
    leaves = [x] + ([b] if with_bias else [])
    dy = torch.randn(6, 20, generator=g)
    a, gate = (x if b is None else x + b).chunk(2, dim=-1)
    ref = torch.nn.functional.gelu(a) * gate
    want = torch.autograd.grad(ref, leaves, dy)
    with Passthrough() if traced else contextlib.nullcontext():
        y = ops.geglu(x, bias=b, backend="torch")

    def no_gelu(*args, **kw):
        raise AssertionError("geglu's backward recomputed GELU")
    monkeypatch.setattr(torch_gelu.F, "gelu", no_gelu)
    got = torch.autograd.grad(y, leaves, dy)
    monkeypatch.undo()
    torch.testing.assert_close(y, ref)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww)


def test_geglu_keeps_activation_only_where_declared():
    x = torch.randn(3, 8)
    for dtype, kept in ((torch.float32, True), (torch.float64, True), (torch.bfloat16, False)):
        _, act = torch.ops.fastbert.geglu_fwd(x.to(dtype), None, "none", "torch")
        assert act.shape == ((3, 4) if kept else (0,)), (dtype, act.shape)
        torch.testing.assert_close(act.float(), torch.nn.functional.gelu(x[:, :4].to(dtype).float())) if kept else None
    _, act = torch.ops.fastbert.geglu_fwd(x, None, "none", "reference")
    assert act.shape == (0,)


@pytest.mark.parametrize("op", ["layer_norm", "gelu", "geglu"])
def test_compile_forward_and_backward_equal_eager(op):
    """The custom-op path under torch.compile (aot_eager: the fake and autograd registrations, no
    C++ toolchain) gives eager's output and gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=g)
    b = torch.randn(32, generator=g)
    fns = {"layer_norm": lambda x, b: ops.layer_norm(x, b, b, residual=x * 0.5, x_bias=b),
           "gelu": lambda x, b: ops.gelu(x, bias=b),
           "geglu": lambda x, b: ops.geglu(x, bias=b)}
    fn = fns[op]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, c in zip(_grads(fn, [x, b]), _grads(compiled, [x, b]), strict=True):
        torch.testing.assert_close(a, c)


def test_functional_entry_points_return_fresh_tensors():
    """A custom op's outputs may alias no input and no other output."""
    import fastbert.backends.torch as tb

    x, w = torch.randn(4, 16), torch.randn(16)
    y, mean, rstd, h = tb.layer_norm_fwd_functional(x, w, w, None, None, eps=1e-5, dropout_p=0.0, seed=None,
                                                    fused=False)
    assert h is None and y.data_ptr() != x.data_ptr()
    assert mean.shape == rstd.shape == (4,)
    for fn in (lambda: tb.gelu_fwd_functional(x, None, approximate="none"),
               lambda: tb.gelu_fwd_functional(x, w, approximate="none")):
        assert fn().data_ptr() != x.data_ptr()
    y = torch.ops.fastbert.layer_norm_bwd(torch.randn(4, 16), x, w, mean, rstd, None, 0.0, True, True, True, False,
                                          "torch")
    assert y[0].data_ptr() != y[3].data_ptr()  # dx and dresidual: distinct on the custom-op path
    torch.testing.assert_close(y[0], y[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_attention_functional_path_matches_reference(dtype, poison):
    """Padded attention without a mask on the eager path: aten's flash output and gradients are
    returned as views (no copies); q/k/v strided views of one packed QKV tensor, as BERT makes them."""
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 19, 3, 4, 40, generator=g, dtype=torch.float64)
    leaves = [qkv[:, :, i] for i in range(3)]  # [2, 19, 4, 40], non-contiguous

    def run(backend, cast):
        def fn(q, k, v):
            return ops.attention(q, k, v, backend=backend)
        outs = _grads(fn, [t.to(cast) for t in leaves])
        return outs

    got = run("torch", dtype)
    assert got[0].is_contiguous()
    for name, o, hi, lo in zip(["out", "dq", "dk", "dv"], got, run("reference", torch.float64),
                               run("reference", dtype)):
        assert_close_to_ref(o, hi, lo, name=name, floor_eps=8.0)
