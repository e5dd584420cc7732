"""CUDA bias-GELU kernels (csrc/gelu.cu) vs the reference: on the CPU through ``cuda-host`` and on a
GPU through ``cuda``, from the one case list in ``_cuda_cases``."""

from __future__ import annotations

import pytest
from _cuda_cases import GELU_CASES, check_gelu_case

from fastbert.backends import get_backend


def _require(backend: str) -> None:
    reason = get_backend(backend).unavailable_reason("gelu")
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("case", GELU_CASES, ids=str)
def test_cuda_host_gelu_matches_reference(case, poison):
    _require("cuda-host")
    check_gelu_case(case, "cuda-host", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GELU_CASES, ids=str)
def test_cuda_gelu_matches_reference(case, poison):
    _require("cuda")
    check_gelu_case(case, "cuda", "cuda")
