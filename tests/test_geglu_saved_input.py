"""GeGLU with a bias on the torch backend (fp32/fp64): the forward keeps ``z = x + bias`` beside
``gelu(a)``, so backward neither adds the bias again nor keeps x — the fused op saves no more than
the unfused ``(x + b).chunk(2)`` / ``gelu`` / ``mul`` sequence and does less work in backward
(it lost to that sequence, 0.69x forward+backward, while it re-added the bias)."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from _custom_op_path import Passthrough

import fastbert.backends.torch.gelu as torch_gelu
import fastbert.ops as ops


def _saved_numel(fn, inputs):
    """Elements autograd keeps for backward while ``fn()`` builds its graph beyond the ``inputs``
    themselves (a saved parameter costs no memory), and fn's result."""
    total = [0]
    own = {t.data_ptr() for t in inputs}

    def pack(t):
        if t.data_ptr() not in own or t.numel() == 0:
            total[0] += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


@pytest.mark.parametrize("path", ["eager", "eager_node", "custom_op"])  # eager: aten's graph (small x)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_geglu_backward_uses_the_saved_z(dtype, approximate, path, monkeypatch, poison):
    traced = path == "custom_op"
    if path == "eager_node":  # x as if above the size where the eager path takes the fused node
        monkeypatch.setattr(sys.modules["fastbert.ops.geglu"], "_NATIVE_MAX_NUMEL", 0)
    g = torch.Generator().manual_seed(11)
    rows, n = 7, 13  # odd sizes: the flat [gelu(a) | z] buffer's two views must not overlap
    x = torch.randn(rows, 2 * n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(2 * n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    a, gate = (x64 + b64).chunk(2, dim=-1)
    ref = torch.nn.functional.gelu(a, approximate=approximate) * gate
    want = torch.autograd.grad(ref, (x64, b64), dy.double())

    with Passthrough() if traced else contextlib.nullcontext():
        y = ops.geglu(x, bias=b, approximate=approximate, backend="torch")
    real_add = torch.add

    def no_add(*args, **kw):
        raise AssertionError("geglu's backward added the bias again")
    monkeypatch.setattr(torch_gelu.torch, "add", no_add)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    monkeypatch.setattr(torch_gelu.torch, "add", real_add)
    assert (type(y.grad_fn).__name__ == "MulBackward0") == (path == "eager")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(dx.double(), want[0], **tol)
    torch.testing.assert_close(db.double(), want[1], **tol)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "custom_op"])
def test_bias_geglu_saves_no_more_than_the_unfused_sequence(traced):
    x = torch.randn(64, 96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)

    def unfused():
        a, gate = (x + b).chunk(2, dim=-1)
        return torch.nn.functional.gelu(a) * gate

    def fused_call():
        with Passthrough() if traced else contextlib.nullcontext():
            return ops.geglu(x, bias=b, backend="torch")
    fused, y = _saved_numel(fused_call, (b,))
    plain, ref = _saved_numel(unfused, (b,))
    torch.testing.assert_close(y, ref)
    assert fused <= plain, (fused, plain)


def test_bias_geglu_custom_op_layout():
    """The custom op (what torch.compile traces) returns the flat [gelu(a) | z] buffer with a bias
    and the (rows, n) activation without; its fake gives the same shapes."""
    x = torch.randn(5, 6)
    b = torch.randn(6)
    y, act = torch.ops.fastbert.geglu_fwd(x, b, "none", "torch")
    z = x + b
    assert act.shape == (5 * 3 * 3,)
    torch.testing.assert_close(act[:15].view(5, 3), torch.nn.functional.gelu(z[:, :3]))
    torch.testing.assert_close(act[15:].view(5, 6), z)
    torch.testing.assert_close(y, torch.nn.functional.gelu(z[:, :3]) * z[:, 3:])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fy, fact = torch.ops.fastbert.geglu_fwd(mode.from_tensor(x), mode.from_tensor(b), "none", "torch")
    assert fy.shape == y.shape and fact.shape == act.shape
