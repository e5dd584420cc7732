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
    "layer_norm": lambda x: ops.layer_norm(x, residual=x.flip(0)),
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
