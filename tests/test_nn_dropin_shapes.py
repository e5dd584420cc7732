"""fastbert.nn.GELU / LayerNorm take every shape torch.nn.GELU / LayerNorm take (found by the
new-user pass: a 0-d or 9-d input raised the op's "x: expected 1 to 8 dims" after swap_modules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastbert.nn as fnn


@pytest.mark.parametrize("shape", [(), (1,) * 9 + (6,), (2, 1, 1, 1, 1, 1, 1, 1, 3, 4)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_takes_any_shape_as_torch_does(shape, approximate):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(3).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = fnn.GELU(approximate)(x)
    ref = F.gelu(ref_x, approximate=approximate)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_layer_norm_takes_nine_dims_as_torch_does():
    g = torch.Generator().manual_seed(9)
    shape = (2, 1, 3, 1, 1, 2, 1, 1, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ln = fnn.LayerNorm(8, eps=1e-12).double()
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        ln.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
    out = ln(x)
    ref = F.layer_norm(ref_x, (8,), ln.weight, ln.bias, 1e-12)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, ref_x.grad)
