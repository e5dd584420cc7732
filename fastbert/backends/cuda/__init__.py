"""CUDA C++ backends: ``cuda`` and ``cuda-host``.

- ``cuda`` runs the kernels of ``csrc/`` from ``fastbert._C`` on NVIDIA GPUs. It is opt-in
  (``backend="cuda"`` or ``FASTBERT_BACKEND=cuda``) and joins auto dispatch for an op only once a
  recorded GPU run has verified that op: :data:`VERIFIED_ON_GPU`.
- ``cuda-host`` runs the same kernel source from ``fastbert._C_host`` on CPU tensors (the fiber
  execution model of csrc/host/host_runtime.h). A test harness: auto dispatch never picks it.

``import fastbert`` never fails because an extension, a driver or a GPU is missing: the backends
then report why they cannot run (``fastbert env`` shows it, with :func:`build_info`).

Layout: this file registers both backends; ``attention.py``, ``layer_norm.py``, ``gelu.py``,
``geglu.py``, ``rotary.py`` turn each op's tensors into the extension's raw-pointer calls
(``csrc/<op>_binding.cpp``); ``_ext.py`` loads the extensions; ``device.py`` / ``host.py`` are
the compute modules, the glue bound to ``fastbert._C`` / ``fastbert._C_host``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from fastbert.backends import BackendSpec, OpCaps, register_backend
from fastbert.backends.cuda import attention, geglu, gelu, layer_norm, rotary
from fastbert.backends.cuda._ext import load_extension

# Set an op to True only from a recorded GPU run of its gpu-marked parity tests (device check).
VERIFIED_ON_GPU = {"attention": False, "layer_norm": False, "gelu": False, "geglu": False, "rotary": False}

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PTXAS_REPORT = Path(__file__).resolve().parents[2] / "_C_ptxas.txt"
_OPS = {"layer_norm": layer_norm, "gelu": gelu, "attention": attention, "geglu": geglu,
        "rotary": rotary}  # op -> its glue module


# The one wording for "no GPU here", shared with ``fastbert env`` (fastbert/env.py re-exports it).
NO_GPU = "no NVIDIA driver / GPU found"


@functools.lru_cache(maxsize=None)
def _cuda_probe() -> str | None:
    ext = load_extension("_C")
    if isinstance(ext, str):
        return ext
    count, why = ext.device_count()  # the extension's own runtime: names a too-old driver
    if count == 0:
        return f"{NO_GPU} (fastbert._C sees no CUDA device: {why})"
    if not torch.cuda.is_available():
        return f"{NO_GPU} (torch sees no CUDA GPU)"
    return None


def _host_probe() -> str | None:
    ext = load_extension("_C_host")
    return ext if isinstance(ext, str) else None


def _caps(device: str, module: str) -> dict[str, OpCaps]:
    """Each op's capabilities, as its glue module declares them."""
    common = dict(devices=(device,), dtypes=DTYPES, module=module)
    head_dims = frozenset(attention.HEAD_DIMS)
    return {
        "layer_norm": OpCaps(features=layer_norm.FEATURES, **common),
        "gelu": OpCaps(features=gelu.FEATURES, **common),
        "geglu": OpCaps(features=geglu.FEATURES, **common),
        "rotary": OpCaps(features=rotary.FEATURES, **common),
        "attention": OpCaps(features=attention.FEATURES, head_dims=head_dims.__contains__,
                            head_dims_doc=attention.HEAD_DIMS_DOC, writes_lse=attention.WRITES_LSE, **common),
    }


def _not_built(name: str, op: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"fastbert.{name} was built without the {op} kernels (an older build, or CMake "
                           f"-DFASTBERT_OPS without {op}): rebuild it (pip install .)")
    return call


def bind(name: str) -> dict:
    """The contract functions (``<op>_fwd`` / ``<op>_bwd`` of every op) bound to extension ``name``
    (``fastbert.backends.cuda.device`` and ``.host`` are these); ImportError when the extension is
    unusable. An op whose binding the extension lacks raises RuntimeError saying so when called."""
    ext = load_extension(name)
    if isinstance(ext, str):
        raise ImportError(ext)
    return {f"{op}_{d}": functools.partial(getattr(glue, f"{op}_{d}"), ext) if hasattr(ext, f"{op}_{d}")
            else _not_built(name, op) for op, glue in _OPS.items() for d in ("fwd", "bwd")}


def ptxas_report() -> list[dict]:
    """Per-kernel ptxas resources of the installed ``fastbert._C`` (empty when not built):
    dicts with kernel, arch, registers, stack_bytes, spill_store_bytes, spill_load_bytes,
    smem_bytes, object."""
    if not PTXAS_REPORT.exists():
        return []
    lines = [ln for ln in PTXAS_REPORT.read_text().splitlines() if ln and not ln.startswith("#")]
    header = lines[0].split("\t")
    rows = []
    for ln in lines[1:]:
        row = dict(zip(header, ln.split("\t")))
        for k in ("registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "smem_bytes"):
            row[k] = int(row[k])
        rows.append(row)
    return rows


def build_info() -> dict:
    """What ``fastbert env`` shows: per extension whether it loads (else why), its build facts
    (version, CUDA version, archs), the ptxas resources per kernel, and the GPU-verified ops."""
    out = {}
    for name in ("_C", "_C_host"):
        ext = load_extension(name)
        out[name] = {"available": False, "reason": ext} if isinstance(ext, str) else {
            "available": True, **ext.build_info()}
    out["_C"]["ptxas"] = ptxas_report()
    out["cuda_backend_unavailable_reason"] = _cuda_probe()
    out["verified_on_gpu"] = dict(VERIFIED_ON_GPU)
    return out


register_backend(BackendSpec(
    name="cuda",
    module="fastbert.backends.cuda.device",
    caps=_caps("cuda", "fastbert.backends.cuda.device"),
    auto=tuple(op for op, ok in VERIFIED_ON_GPU.items() if ok),
    probe=_cuda_probe,
))
register_backend(BackendSpec(
    name="cuda-host",
    module="fastbert.backends.cuda.host",
    caps=_caps("cpu", "fastbert.backends.cuda.host"),
    auto=(),
    probe=_host_probe,
))
