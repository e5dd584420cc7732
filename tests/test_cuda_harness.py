"""The host execution model (csrc/host/host_runtime.h) and the harness's ability to fail.

Self-test kernels (csrc/harness/harness.cu) check shuffles, ballots, block reductions and shared memory
against values worked out by hand, and that faults a GPU would hide or hang on raise. Planted bugs
(``FASTBERT_CUDA_FAULT``, csrc/README.md) must make the ``cuda-host`` parity checks FAIL: a
harness that cannot fail proves nothing. The harness and the faults are compiled only into the
harness modules (``fastbert._C_host``; on a GPU ``fastbert._C_harness``), never into ``fastbert._C``.
"""

from __future__ import annotations

import pytest
import torch
from _cases_gelu import GELU_CASES, check_gelu_case
from _cases_layer_norm import LAYER_NORM_CASES, check_layer_norm_case

from fastbert.backends.cuda._ext import launch_kwargs, load_extension


def _ext(name: str):
    ext = load_extension(name)
    if isinstance(ext, str):
        pytest.skip(ext)
    return ext


def _run(ext, device: str, mode: int, grid: int, block: int, smem: int = 0) -> torch.Tensor:
    out = torch.zeros(grid * block, 4, dtype=torch.int32, device=device)
    ext._harness(mode=mode, out=out.data_ptr(), grid=grid, block=block, smem_bytes=smem, **launch_kwargs(out))
    return out.view(grid, block, 4).cpu()


def _check_shuffles(out: torch.Tensor) -> None:
    lane = torch.arange(out.shape[1]) % 32
    assert (out[..., 0] == 496).all()  # sum of lanes 0..31, on every lane
    assert (out[..., 1] == 30).all()  # broadcast from lane 3
    assert torch.equal(out[0, :, 2], torch.where(lane < 31, lane + 1, lane).int())  # shfl_down by 1
    assert (out[..., 3] == torch.tensor(0xAAAAAAAA - 2**32, dtype=torch.int64)).all()  # odd lanes


def _check_block(out: torch.Tensor, host: bool) -> None:
    grid, n, _ = out.shape
    t = torch.arange(n)
    assert (out[..., 0] == n * (n - 1) // 2).all()
    for b in range(grid):
        assert torch.equal(out[b, :, 1], (n - 1 - t + 1000 * b).int())  # static __shared__ per block
        assert torch.equal(out[b, :, 3], (2 * ((t + 1) % n)).int())  # dynamic shared memory
    if host:
        assert (out[..., 2] == -1).all()  # dynamic shared memory is poisoned before each block


@pytest.mark.parametrize("block", [32, 96])
def test_host_shuffles_and_ballot(block):
    _check_shuffles(_run(_ext("_C_host"), "cpu", 0, 2, block))


@pytest.mark.parametrize("grid,block", [(3, 96), (1, 1024)])
def test_host_block_reduce_and_shared_memory(grid, block):
    _check_block(_run(_ext("_C_host"), "cpu", 1, grid, block, smem=4 * block), host=True)


def test_host_generic_warp_exchange():
    out = _run(_ext("_C_host"), "cpu", 5, 1, 64)
    assert (out[..., 0] == 992).all()
    assert torch.equal(out[0, :, 1], ((torch.arange(64) + 5) % 32).int())


@pytest.mark.parametrize("mode,message", [
    (2, "deadlock.*warp 0 waits in a warp op"),  # lanes of the mask exited
    (3, "deadlock.*32 of 64 live threads wait at __syncthreads"),  # barrier vs warp op
    (4, "different warp ops.*payload 4 vs 8 bytes"),  # divergent warp code
    (6, r"thread \(\d+,0,0\): shuffle reads a source lane outside its mask"),
])
def test_host_runtime_reports_faults_a_gpu_would_hide(mode, message):
    with pytest.raises(RuntimeError, match=message):
        _run(_ext("_C_host"), "cpu", mode, 1, 64)


def test_host_launch_shape_is_checked():
    ext = _ext("_C_host")
    out = torch.zeros(2048 * 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="block of 2048 threads"):
        ext._harness(mode=0, out=out.data_ptr(), grid=1, block=2048, device=-1)


@pytest.mark.gpu
def test_gpu_runs_the_same_self_tests():
    ext = _ext("_C_harness")  # the device check builds it (FASTBERT_BUILD_HARNESS=1); never in _C
    _check_shuffles(_run(ext, "cuda", 0, 2, 96))
    _check_block(_run(ext, "cuda", 1, 3, 96, smem=4 * 96), host=False)


@pytest.mark.parametrize("fault", [1, 2])
def test_planted_layer_norm_bugs_fail_parity(fault, monkeypatch, poison):
    """fault 1: the last column of every row is skipped; fault 2: a barrier of the block reduction
    is dropped (a race: the host's fiber schedule reads the partials before they are written)."""
    _ext("_C_host")
    case = next(c for c in LAYER_NORM_CASES if c.hidden == 1023 and c.dtype == torch.float32)
    check_layer_norm_case(case, "cuda-host", "cpu")  # passes without the fault
    monkeypatch.setenv("FASTBERT_CUDA_FAULT", str(fault))
    with pytest.raises(AssertionError):
        check_layer_norm_case(case, "cuda-host", "cpu")


def test_planted_gelu_bug_fails_parity(monkeypatch, poison):
    _ext("_C_host")
    case = next(c for c in GELU_CASES if c.rows > 32)
    monkeypatch.setenv("FASTBERT_CUDA_FAULT", "1")
    with pytest.raises(AssertionError):
        check_gelu_case(case, "cuda-host", "cpu")
