"""The CUDA C++ extensions (``fastbert._C`` on GPUs, ``fastbert._C_host`` on the CPU,
``fastbert._C_harness`` for the GPU self-test): loading, and the raw-pointer calling convention
every op's glue (``attention.py``, ``layer_norm.py``, ``gelu.py``) uses.

The extensions take pointers and sizes as ints, dtypes as codes, the CUDA stream and device as
ints, and never allocate; the only allocation in the glue is the fp32 workspace of the
deterministic column reductions (:func:`column_workspace`, from torch's allocator, so it is
graph-safe). See csrc/README.md.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from fastbert.backends import workspace

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EXTENSIONS = ("_C", "_C_host", "_C_harness")

_loaded: dict[str, ModuleType | str] = {}


def load_extension(name: str) -> ModuleType | str:
    """Extension ``name`` (one of :data:`EXTENSIONS`, loaded once), or why it cannot be used."""
    if name not in _loaded:
        import fastbert

        try:
            ext = importlib.import_module(f"fastbert.{name}")
        except ImportError as exc:
            how = {"_C": "no nvcc (CUDA >= 12) at install time or FASTBERT_BUILD_CUDA=0",
                   "_C_host": "no C++20 compiler at install time or FASTBERT_BUILD_HOST=0",
                   "_C_harness": "built only with FASTBERT_BUILD_HARNESS=1 and nvcc (the device check)"}[name]
            _loaded[name] = f"fastbert.{name} is not built ({how}; reinstall with pip install .): {exc}"
        else:
            built = ext.version()
            _loaded[name] = ext if built == fastbert.__version__ else (
                f"fastbert.{name} was built for fastbert {built} but this is fastbert "
                f"{fastbert.__version__}: rebuild it (pip install .)")
    return _loaded[name]


def ptr(t: torch.Tensor | None) -> int:
    """The tensor's data pointer as an int, 0 for None."""
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor | None) -> int:
    """The extension's dtype code of ``t`` (0 for None)."""
    return 0 if t is None else DTYPE_CODES[t.dtype]


def launch_kwargs(t: torch.Tensor) -> dict:
    """``stream`` and ``device`` for a launch on ``t``'s device: torch's current stream on a GPU,
    (0, -1) for CPU tensors (the host build)."""
    if t.is_cuda:
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream, "device": t.device.index}
    return {"stream": 0, "device": -1}


def fault_injection() -> int:
    """The planted-bug switch ``FASTBERT_CUDA_FAULT`` (0 = off; csrc/README.md), read per call.
    Only the harness builds (``fastbert._C_host``) compile the faults in; ``fastbert._C`` rejects
    a nonzero value."""
    return int(os.environ.get("FASTBERT_CUDA_FAULT", "0") or 0)


def column_workspace(nbytes: int, like: torch.Tensor) -> torch.Tensor | None:
    """``nbytes`` of fp32 scratch on ``like``'s device for the deterministic column sums (None
    for 0 bytes), 16-byte granular as the extension's ``*_workspace_bytes`` queries expect."""
    return workspace((((nbytes + 15) // 16) * 4,), torch.float32, like.device) if nbytes else None
