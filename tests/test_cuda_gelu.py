"""CUDA bias-GELU kernels (csrc/gelu.cu) vs the reference: on the CPU through ``cuda-host`` and on a
GPU through ``cuda``, from the one case list in ``_cases_gelu``."""

from __future__ import annotations

import pytest
from _cases import CUDA_BACKENDS, require_backend
from _cases_gelu import GELU_CASES, check_gelu_case
from _cuda_graph import assert_replay_matches_eager


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", GELU_CASES, ids=str)
def test_cuda_gelu_matches_reference(case, backend, device, poison):
    require_backend(backend, "gelu")
    check_gelu_case(case, backend, device)


@pytest.mark.gpu
def test_cuda_gelu_captures_and_replays_in_a_cuda_graph():
    """Forward and backward (dbias workspace from torch's allocator) capture in a CUDA graph; a
    replay on new input values equals an eager run, bit for bit (deterministic reductions)."""
    require_backend("cuda", "gelu")
    import torch

    from fastbert.ops import gelu

    x = torch.randn(96, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(96, 3072, device="cuda", dtype=torch.bfloat16)

    def step():
        y = gelu(x, bias=bias, approximate="tanh", backend="cuda")
        return (y,) + torch.autograd.grad(y, (x, bias), dy)

    assert_replay_matches_eager(step, refresh=(x,), names=("y", "dx", "dbias"), what="gelu cuda")
