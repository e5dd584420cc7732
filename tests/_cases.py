"""What the per-op case lists (``_cases_attention``, ``_cases_layer_norm``, ``_cases_gelu``) share:
dtype names, the fp64 master-input draw, the run-three-times parity check (STYLE.md's tolerance
rule; ``check_rounded_runs`` for suites whose reference runs on the inputs rounded to the case's
dtype) and the skip for a backend that cannot run an op here.

Every backend's parity test of an op runs the op's one case list: forward and backward through
``fastbert.ops`` with the backend under test (outputs poisoned by the caller's ``poison``
fixture), against the reference in fp64 and in the case's dtype.
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_close_to_ref

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# The CUDA kernels' two backends: the host build on the CPU (CI), the GPU build (device check).
CUDA_BACKENDS = (pytest.param("cuda-host", "cpu", id="cuda-host"),
                 pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda"))


def randn(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    """fp64 normal draw from ``gen`` (master copies, cast per run)."""
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def check_runs(case, run, inputs: dict, backend: str, device, floor_eps=None) -> dict:
    """``run(inputs, backend, device, dtype) -> {name: tensor}`` on ``backend`` in the case's dtype
    vs the reference in fp64 and in the case's dtype; every output within the tolerance rule.
    ``floor_eps(name, hi)`` gives the floor per output (default 4 eps). Returns the backend's run."""
    got = run(inputs, backend, device, case.dtype)
    hi = run(inputs, "reference", device, torch.float64)
    lo = run(inputs, "reference", device, case.dtype)
    assert list(got) == list(hi), f"{case}: outputs {list(got)} != reference's {list(hi)}"
    for name in hi:
        kw = {} if floor_eps is None else {"floor_eps": floor_eps(name, hi)}
        assert_close_to_ref(got[name].cpu(), hi[name].cpu(), lo[name].cpu(), name=f"{case} {name}", **kw)
    return got


def check_rounded_runs(run, backend: str, dtype: torch.dtype, out_dtype=None) -> None:
    """``run(backend, cast) -> {name: tensor}`` takes its inputs rounded to ``dtype`` and computes
    in ``cast``: ``backend`` in ``dtype`` vs the reference on the same rounded inputs in fp64 and in
    ``dtype``; each output in ``out_dtype`` (default: the low-precision reference's dtype) and
    within the tolerance rule."""
    got = run(backend, dtype)
    hi = run("reference", torch.float64)
    lo = run("reference", dtype)
    for name in got:
        assert got[name].dtype == (lo[name].dtype if out_dtype is None else out_dtype), name
        assert_close_to_ref(got[name].cpu(), hi[name].cpu(), lo[name].cpu(), name=name)


def require_backend(backend: str, op: str) -> None:
    """Skip with the backend's own reason when ``backend`` cannot run ``op`` here."""
    from fastbert.backends import get_backend

    spec = get_backend(backend)
    reason = spec.unavailable_reason(op)
    if reason is None and op not in spec.caps:
        reason = f"the extension has no {op} kernels"
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
