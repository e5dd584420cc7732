"""CUDA GeGLU kernels (csrc/geglu.cu) vs the fp64 reference: on the CPU through ``cuda-host`` and on
a GPU through ``cuda``.

Every case runs ``fastbert.ops.geglu`` forward and backward (outputs poisoned) and compares y, dx
and dbias with the reference in fp64 and in the case's dtype (``_cases.check_runs``). The default
grid covers every axis value at least once: fp32/fp16/bf16; exact and tanh GELU; bias absent, in
x's dtype or fp32; half widths n = 1, 7, 13 (scalar path), 24, 384, 1152 (ModernBERT-base), 1536
(16-byte path) and 1023; 1 to 70 rows (one and several row splits of the dbias reduction). Also
the planted off-by-one fault failing the check, the binding's checks, and (GPU) CUDA-graph capture.
The full product is behind ``slow``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _cases import BF16, CUDA_BACKENDS, F16, F32, require_backend
from _cases_gelu import GegluCase, check_gelu_case
from _cuda_graph import assert_replay_matches_eager

from fastbert.ops import geglu


GEGLU_CASES = (
    GegluCase(5, 1023, F32, "fp32"),
    GegluCase(4, 384, F16, "x", "tanh"),
    GegluCase(3, 1536, BF16, "none"),
    GegluCase(1, 1, F32, "x", "tanh"),
    GegluCase(40, 24, F16, "fp32"),
    GegluCase(7, 1152, BF16, "x", "tanh"),
    GegluCase(70, 13, F32, "none", "tanh"),
    GegluCase(2, 7, BF16, "fp32"),
    GegluCase(3, 1152, F32, "x"),
    GegluCase(6, 1023, F16, "none", "tanh"),
)

SLOW_CASES = tuple(GegluCase(rows, half, dtype, bias, approximate) for rows, half, dtype, bias, approximate in
                   itertools.product((1, 33, 300), (1, 5, 64, 1152, 2049), (F32, F16, BF16), ("x", "fp32", "none"),
                                     ("none", "tanh")))


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", GEGLU_CASES, ids=str)
def test_cuda_geglu_matches_reference(case, backend, device, poison):
    require_backend(backend, "geglu")
    check_gelu_case(case, backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_cuda_geglu_matches_reference_full_grid(case, backend, device, poison):
    require_backend(backend, "geglu")
    check_gelu_case(case, backend, device)


def test_cuda_geglu_planted_fault_fails_the_check(monkeypatch, poison):
    """FASTBERT_CUDA_FAULT=1 drops the last column: the parity check must fail."""
    require_backend("cuda-host", "geglu")
    monkeypatch.setenv("FASTBERT_CUDA_FAULT", "1")
    for case in (GEGLU_CASES[1], GEGLU_CASES[6]):  # the 16-byte path's shape and a scalar one
        with pytest.raises(AssertionError):
            check_gelu_case(case, "cuda-host", "cpu")


def test_cuda_geglu_binding_checks_its_arguments():
    require_backend("cuda-host", "geglu")
    from fastbert.backends.cuda._ext import load_extension

    ext = load_extension("_C_host")
    x, y = torch.randn(2, 8), torch.randn(2, 4)
    kw = dict(x=x.data_ptr(), bias=0, y=y.data_ptr(), rows=2, half=4, dtype=0, device=-1)
    ext.geglu_fwd(**kw)  # valid
    with pytest.raises(ValueError, match="half: expected > 0, got 0"):
        ext.geglu_fwd(**{**kw, "half": 0})
    with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh', got 'fast'"):
        ext.geglu_fwd(**{**kw, "approximate": "fast"})
    with pytest.raises(ValueError, match="y: expected a pointer aligned to 4 bytes"):
        ext.geglu_fwd(**{**kw, "y": y.data_ptr() + 2})
    need = ext.geglu_bwd_workspace_bytes(rows=2, half=4, need_dbias=True)
    assert need == 4 * 1 * 8  # one row split x 2n fp32 partials
    with pytest.raises(ValueError, match=rf"workspace_bytes: expected >= {need}"):
        ext.geglu_bwd(dy=y.data_ptr(), x=x.data_ptr(), bias=0, dx=x.data_ptr(), dbias=y.data_ptr(), workspace=0,
                      workspace_bytes=0, rows=2, half=4, dtype=0, device=-1)


@pytest.mark.gpu
def test_cuda_geglu_captures_and_replays_in_a_cuda_graph():
    """Forward and backward (dbias workspace from torch's allocator) capture in a CUDA graph; a
    replay on new input values equals an eager run, bit for bit (deterministic reductions)."""
    require_backend("cuda", "geglu")
    x = torch.randn(96, 2 * 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(2 * 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(96, 1152, device="cuda", dtype=torch.bfloat16)

    def step():
        y = geglu(x, bias=bias, backend="cuda")
        return (y,) + torch.autograd.grad(y, (x, bias), dy)

    assert_replay_matches_eager(step, refresh=(x,), names=("y", "dx", "dbias"), what="geglu cuda")
