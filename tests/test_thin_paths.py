"""The thinner eager path of fastbert.ops (issue 16, tiny shapes): what it skips must not change
results. Dead functorch wrappers take the custom op; autocast helpers take a tensor; gradients not
asked for stay None; FASTBERT_BACKEND written straight into os.environ is seen by the next call.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastbert.ops as ops
from fastbert.ops._common import autocast_dtype, eager_direct, no_autocast
from fastbert.ops._dispatch import record_dispatch
from _custom_op_path import output_and_grads


def test_dead_functorch_wrapper_takes_the_custom_op_and_matches():
    leaked = []

    def f(x):
        leaked.append(x * 1)  # escapes the transform: a wrapper whose level is dead afterwards
        return x.sum()

    torch.func.grad(f)(torch.randn(4, 8, dtype=torch.float64))
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    assert not eager_direct(dead)
    assert eager_direct(torch.randn(2))
    y = ops.gelu(dead)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(y)
    torch.testing.assert_close(y, F.gelu(dead))


def test_autocast_helpers_take_a_tensor_or_a_device_type():
    x = torch.randn(3, 4)
    assert autocast_dtype(x) is None and autocast_dtype("cpu") is None
    with no_autocast(x):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(x) == torch.bfloat16 and autocast_dtype("cpu") == torch.bfloat16
        for arg in (x, "cpu"):
            with no_autocast(arg):
                assert not torch.is_autocast_enabled("cpu")
            assert torch.is_autocast_enabled("cpu")
        assert ops.gelu(x).dtype == torch.bfloat16


def test_gradients_not_asked_for_stay_none_and_the_rest_match():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=g, dtype=torch.float64)  # no gradient asked
    dy = torch.randn(5, 12, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(ops.gelu(x, bias=b), x, dy)
    (ref,) = torch.autograd.grad(F.gelu(x + b), x, dy)
    torch.testing.assert_close(dx, ref)
    ops.gelu(x, bias=b).backward(dy)
    assert b.grad is None and x.grad is not None

    w = torch.randn(12, generator=g, dtype=torch.float32, requires_grad=True)  # fp32 weight, fp64 x
    bias = torch.randn(12, generator=g, dtype=torch.float64)
    y = ops.layer_norm(x, w, bias)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(F.layer_norm(x, (12,), w.double(), bias), (x, w), dy)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)

    z = torch.randn(5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(24, generator=g, dtype=torch.float64)
    (dz,) = torch.autograd.grad(ops.geglu(z, bias=zb), z, dy)
    a, gate = (z + zb).chunk(2, dim=-1)
    (rz,) = torch.autograd.grad(F.gelu(a) * gate, z, dy)
    torch.testing.assert_close(dz, rz)


def test_environment_written_directly_is_seen_by_the_next_call():
    x = torch.randn(3, 8)
    old = os.environ.pop("FASTBERT_BACKEND", None)
    try:
        with record_dispatch() as used:
            ops.gelu(x)
        assert used["gelu"] == {"torch"}
        os.environ["FASTBERT_BACKEND"] = "reference"
        with record_dispatch() as used:
            ops.gelu(x)
        assert used["gelu"] == {"reference"}
        del os.environ["FASTBERT_BACKEND"]
        with record_dispatch() as used:
            ops.gelu(x)
        assert used["gelu"] == {"torch"}
    finally:
        os.environ.pop("FASTBERT_BACKEND", None)
        if old is not None:
            os.environ["FASTBERT_BACKEND"] = old


def test_nd_inputs_flattened_inside_the_node_match_the_custom_op_path(poison):
    """N-D x (and residual) are flattened inside the eager autograd node, not by two autograd
    views: outputs, shapes and gradients equal the custom-op path's, 1-D and 3-D, with and without
    gradients."""
    g = torch.Generator().manual_seed(7)
    x3 = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    b = torch.randn(16, generator=g, dtype=torch.float64)
    res = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    cases = [
        (lambda x, b, r: ops.layer_norm(x, b, b, residual=r, x_bias=b), (x3, b, res)),
        (lambda x, b: ops.layer_norm(x, b, None), (x3[0, 0], b)),
        (lambda x, b: ops.gelu(x, bias=b), (x3, b)),
        (lambda x: ops.gelu(x), (x3[:, 1],)),
        (lambda x, b: ops.geglu(x, bias=b), (x3, b)),
        # the torch backend's fp64 GELU / GeGLU records aten's graph: the reference's takes the node
        (lambda x, b: ops.gelu(x, bias=b, backend="reference"), (x3, b)),
        (lambda x: ops.gelu(x, backend="reference"), (x3[:, 1],)),
        (lambda x, b: ops.geglu(x, bias=b, backend="reference"), (x3, b)),
    ]
    for fn, inputs in cases:
        def run(traced):  # the custom-op path under a pass-through mode, else the eager path
            return output_and_grads(fn, inputs, lambda y: torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape),
                                    traced)

        want, got = run(True), run(False)
        for a, c in zip(got, want, strict=True):
            assert a.shape == c.shape
            torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(fn(*inputs), want[0], atol=1e-12, rtol=1e-12)


def test_nd_eager_call_adds_no_view_nodes():
    x = torch.randn(2, 3, 8, requires_grad=True)
    for y in (ops.gelu(x, backend="reference"), ops.layer_norm(x, residual=x.detach(), backend="reference"),
              ops.geglu(x, backend="reference"), ops.gelu(x.bfloat16())):
        assert type(y.grad_fn).__name__ == "_EagerFunctionBackward", y.grad_fn
        nxt = type(y.grad_fn.next_functions[0][0]).__name__
        assert nxt == ("ToCopyBackward0" if y.dtype == torch.bfloat16 else "AccumulateGrad")  # no view of x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_backend_gelu_records_the_plain_torch_graph(dtype, with_bias, poison):
    """fp32/fp64 GELU and GeGLU on the torch backend, with gradients: aten's own backward nodes
    (no Python node, ``z = x + bias`` kept rather than added again), the plain torch sequence's
    graph; outputs and gradients bitwise the plain sequence's, N-D x included."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(8, generator=g, dtype=dtype, requires_grad=True) if with_bias else None
    leaves = (x, b) if with_bias else (x,)
    z = x if b is None else x + b

    def unfused_geglu(z):
        a, gate = z.chunk(2, dim=-1)
        return F.gelu(a, approximate="tanh") * gate
    for fn, ref, node in ((lambda: ops.gelu(x, bias=b), lambda: F.gelu(z), "GeluBackward0"),
                          (lambda: ops.geglu(x, bias=b, approximate="tanh"), lambda: unfused_geglu(z),
                           "MulBackward0")):
        y, want = fn(), ref()
        assert type(y.grad_fn).__name__ == node
        dy = torch.randn(y.shape, generator=g, dtype=dtype)
        assert torch.equal(y, want)
        for a, c in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(want, leaves, dy, retain_graph=True)):
            assert torch.equal(a, c)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_calls_trace_the_custom_ops_not_the_eager_path(dynamic):
    """eager_direct / resolve_call call torch.compiler.is_compiling through a name bound at import
    (the same function object, which Dynamo folds to True): a traced call records fastbert's
    custom ops, not the eager path's aten calls; the vector checks (``shape == (size,)``) trace
    with a symbolic hidden size too."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, w, b):
        return ops.gelu(ops.layer_norm(x, w, b), bias=b)

    torch._dynamo.reset()
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    compiled = torch.compile(f, backend=capture, fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "fastbert.layer_norm_fwd.default" in targets and "fastbert.gelu_fwd.default" in targets, targets
    assert not any("native_layer_norm" in t for t in targets), targets
    torch._dynamo.reset()
