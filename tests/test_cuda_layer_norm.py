"""CUDA LayerNorm kernels (csrc/layer_norm.cu) vs the reference: on the CPU through ``cuda-host``
(the same kernel source under the fiber execution model) and on a GPU through ``cuda``, from the
one case list in ``_cases_layer_norm``."""

from __future__ import annotations

import pytest
import torch
from _cases import CUDA_BACKENDS, require_backend
from _cases_layer_norm import LAYER_NORM_CASES, check_layer_norm_case
from _cuda_graph import assert_replay_matches_eager

from fastbert.backends import get_backend
from fastbert.backends._philox import rows_keep_mask


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=str)
def test_cuda_layer_norm_matches_reference(case, backend, device, poison):
    require_backend(backend, "layer_norm")
    check_layer_norm_case(case, backend, device)


def _dropout_mask(backend: str, device: str, rows: int, hidden: int, dtype) -> tuple:
    """h = dropout(x) from the backend's forward (contract call) and the reference keep mask."""
    mod = get_backend(backend).load("layer_norm")
    x = torch.rand(rows, hidden, device=device).add_(0.5).to(dtype)  # no zeros: h == 0 <=> dropped
    seed = torch.tensor([0x12345678, 0x9ABCDEF0], dtype=torch.int64, device=device)
    y, h = torch.empty_like(x), torch.full_like(x, float("nan"))
    mean = torch.empty(rows, device=device)
    rstd = torch.empty(rows, device=device)
    mod.layer_norm_fwd(x, None, None, None, None, y, mean, rstd, h, eps=1e-5, dropout_p=0.3, seed=seed)
    return h != 0, rows_keep_mask(seed, 0.3, rows, hidden, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_host_dropout_mask_is_the_reference_mask(dtype):
    require_backend("cuda-host", "layer_norm")
    got, ref = _dropout_mask("cuda-host", "cpu", 9, 1023, dtype)
    assert torch.equal(got, ref)
    assert 0.6 < ref.float().mean() < 0.8


@pytest.mark.gpu
def test_cuda_dropout_mask_is_the_reference_mask():
    require_backend("cuda", "layer_norm")
    got, ref = _dropout_mask("cuda", "cuda", 9, 1023, torch.float16)
    assert torch.equal(got, ref)


@pytest.mark.gpu
def test_cuda_layer_norm_captures_and_replays_in_a_cuda_graph():
    """No host syncs or allocations outside torch's allocator: forward and backward capture in a
    CUDA graph, and a replay on new input values equals an eager run."""
    require_backend("cuda", "layer_norm")
    from fastbert.ops import layer_norm

    dev = "cuda"
    x = torch.randn(64, 768, device=dev, dtype=torch.float16, requires_grad=True)
    w = torch.randn(768, device=dev, requires_grad=True)
    b = torch.randn(768, device=dev, requires_grad=True)
    res = torch.randn(64, 768, device=dev, dtype=torch.float16, requires_grad=True)
    dy = torch.randn(64, 768, device=dev, dtype=torch.float16)

    def step():
        y = layer_norm(x, w, b, residual=res, backend="cuda")
        return (y,) + torch.autograd.grad(y, (x, w, b, res), dy)

    assert_replay_matches_eager(step, refresh=(x, res), names=("y", "dx", "dweight", "dbias", "dresidual"),
                                what="layer_norm cuda")


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_stable_variance_large_mean_and_zero_rows(backend, device):
    """Welford + Chan merging: a mean of 2000 with unit spread keeps fp32 accuracy (the naive
    E[h^2] - E[h]^2 would lose it); an all-zero row normalises to zeros and returns bias."""
    require_backend(backend, "layer_norm")
    import torch.nn.functional as F

    from fastbert.ops import layer_norm

    g = torch.Generator().manual_seed(5)
    x = torch.cat([2000.0 + torch.randn(3, 768, generator=g), torch.zeros(1, 768)]).to(device)
    w = torch.randn(768, generator=g).to(device)
    b = torch.randn(768, generator=g).to(device)
    y = layer_norm(x, w, b, backend=backend)
    ref = F.layer_norm(x.double(), (768,), w.double(), b.double()).float()
    assert (y - ref).abs().max().item() < 1e-3
    assert torch.equal(y[3], b)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_backward_is_deterministic(backend, device):
    """dweight/dbias/dx_bias come from fixed-order partial sums: repeated runs are bit-identical."""
    require_backend(backend, "layer_norm")
    from fastbert.ops import layer_norm

    rows = 70 if backend == "cuda-host" else 8192
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 768, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(768, generator=g).to(device).requires_grad_()
    b = torch.randn(768, generator=g).to(device).requires_grad_()
    xb = torch.randn(768, generator=g).to(device).requires_grad_()
    dy = torch.randn(rows, 768, generator=g).to(device=device, dtype=torch.bfloat16)

    def grads():
        torch.manual_seed(0)
        y = layer_norm(x, w, b, x_bias=xb, dropout_p=0.1, backend=backend)
        return torch.autograd.grad(y, (x, w, b, xb), dy)

    first = grads()
    for _ in range(2):
        for a, c in zip(first, grads()):
            assert torch.equal(a, c)
