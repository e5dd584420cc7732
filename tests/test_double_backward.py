"""Double backward: a gradient taken with ``create_graph=True`` exists; differentiating it again
raises an error naming the fastbert op (or, where the torch backend records aten's own graph,
works as aten's does)."""

import pytest
import torch

import fastbert.ops as ops


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


CASES = {
    "gelu": lambda x: ops.gelu(x, backend="reference"),
    "geglu": lambda x: ops.geglu(torch.cat([x, x.flip(-1)], -1), backend="reference"),
    "layer_norm": lambda x: ops.layer_norm(x, residual=x.flip(0), backend="reference"),
    "attention": lambda x: ops.attention(*(x.view(1, 3, 1, 6),) * 3),
    "rotary": lambda x: ops.rotary(x.view(1, 3, 1, 6), x.view(1, 3, 1, 6).flip(1),
                                   torch.ones(3, 3, dtype=torch.float64),
                                   torch.zeros(3, 3, dtype=torch.float64))[0],
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_second_derivative_names_the_op(op):
    x = _x(3, 6)
    g, = torch.autograd.grad(CASES[op](x).pow(2).sum(), x, create_graph=True)
    assert g.requires_grad and torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match=rf"fastbert\.ops\.{op}: double backward .* not supported"):
        torch.autograd.grad(g.sum(), x)


def test_plain_gelu_on_the_torch_backend_records_aten_and_differentiates_twice():
    x = _x(3, 6)
    g, = torch.autograd.grad(ops.gelu(x).pow(2).sum(), x, create_graph=True)
    h, = torch.autograd.grad(g.sum(), x)
    x2 = x.detach().requires_grad_()
    g2, = torch.autograd.grad(torch.nn.functional.gelu(x2).pow(2).sum(), x2, create_graph=True)
    torch.testing.assert_close(h, torch.autograd.grad(g2.sum(), x2)[0])


@pytest.mark.parametrize("fused", [False, True])
def test_plain_layer_norm_on_the_torch_backend_differentiates_twice_where_aten_is_stable(fused):
    """fp64 rows with |mean| * rstd <= 1 record aten's graph (the add & norm's adds included): the
    second derivative equals F.layer_norm's. Shifted rows (x + 10: |mean| * rstd > 1) take
    fastbert's node, whose double backward raises the named error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(6, dtype=torch.float64, generator=gen)
    res = torch.randn(3, 6, dtype=torch.float64, generator=gen) if fused else None
    xb = torch.randn(6, dtype=torch.float64, generator=gen) if fused else None

    def second(f, x):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        g, = torch.autograd.grad(f(*leaves).pow(2).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(g.sum(), leaves)

    fb = lambda x, w: ops.layer_norm(x, w, residual=res, x_bias=xb, backend="torch")  # noqa: E731
    want = second(lambda x, w: torch.nn.functional.layer_norm(x + xb + res if fused else x, (6,), w), x)
    for a, b in zip(second(fb, x), want, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"fastbert\.ops\.layer_norm: double backward .* not supported"):
        second(fb, x + 10)
