"""fastbert.nn.GELU / LayerNorm take every shape torch.nn.GELU / LayerNorm take (found by the
new-user pass: a 0-d or 9-d input raised the op's "x: expected 1 to 8 dims" after swap_modules)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastbert.nn as fnn


def _like_torch(module, torch_fn, shape, g):
    """``module`` and ``torch_fn`` agree on a fresh fp64 input of ``shape``: output and input gradient."""
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(3).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    out, ref = module(x), torch_fn(ref_x)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("shape", [(), (1,) * 9 + (6,), (2, 1, 1, 1, 1, 1, 1, 1, 3, 4)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_takes_any_shape_as_torch_does(shape, approximate):
    _like_torch(fnn.GELU(approximate), lambda x: F.gelu(x, approximate=approximate), shape,
                torch.Generator().manual_seed(len(shape)))


def test_layer_norm_takes_nine_dims_as_torch_does():
    g = torch.Generator().manual_seed(9)
    ln = fnn.LayerNorm(8, eps=1e-12).double()
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        ln.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
    _like_torch(ln, lambda x: F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-12), (2, 1, 3, 1, 1, 2, 1, 1, 8), g)
