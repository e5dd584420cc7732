"""CUDA C++ backends: ``cuda`` and ``cuda-host``.

- ``cuda`` runs the kernels of ``csrc/`` from ``fastbert._C`` on NVIDIA GPUs. It is opt-in
  (``backend="cuda"`` or ``FASTBERT_BACKEND=cuda``) and joins auto dispatch for an op only once a
  recorded GPU run has verified that op: :data:`VERIFIED_ON_GPU`.
- ``cuda-host`` runs the same kernel source from ``fastbert._C_host`` on CPU tensors (the fiber
  execution model of csrc/common/host_runtime.h). A test harness: auto dispatch never picks it.

``import fastbert`` never fails because an extension, a driver or a GPU is missing: the backends
then report why they cannot run (``fastbert env`` shows it, with :func:`build_info`).
"""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path

import torch

from fastbert.backends import BackendSpec, OpCaps, register_backend
from fastbert.backends._cuda_ops import load_extension

logger = logging.getLogger("fastbert")

# Set an op to True only from a recorded GPU run of its gpu-marked parity tests (device check).
VERIFIED_ON_GPU = {"attention": False, "layer_norm": False, "gelu": False}

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYER_NORM_FEATURES = frozenset({"weight", "bias", "residual", "x_bias", "dropout", "deterministic"})
GELU_FEATURES = frozenset({"bias", "deterministic"})
PTXAS_REPORT = Path(__file__).resolve().parent.parent / "_C_ptxas.txt"


@functools.lru_cache(maxsize=None)
def _cuda_probe() -> str | None:
    ext = load_extension("_C")
    if isinstance(ext, str):
        return ext
    count, why = ext.device_count()  # the extension's own runtime: names a too-old driver
    if count == 0:
        return f"fastbert._C sees no CUDA device ({why})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def _host_probe() -> str | None:
    ext = load_extension("_C_host")
    return ext if isinstance(ext, str) else None


def _attention_caps(device: str, module: str) -> OpCaps | None:
    """Attention's capabilities, declared by ``fastbert.backends._cuda_attention`` when it exists."""
    try:
        attn = importlib.import_module("fastbert.backends._cuda_attention")
    except ModuleNotFoundError as exc:
        if exc.name == "fastbert.backends._cuda_attention":
            return None
        logger.warning("fastbert: CUDA attention unavailable: %s", exc)
        return None
    except Exception as exc:  # a broken optional module must not break import fastbert
        logger.warning("fastbert: CUDA attention unavailable: %s: %s", type(exc).__name__, exc)
        return None
    head_dims = tuple(attn.HEAD_DIMS)
    return OpCaps(devices=(device,), dtypes=DTYPES, head_dims=lambda d: d in head_dims,
                  head_dims_doc=getattr(attn, "HEAD_DIMS_DOC", ", ".join(map(str, head_dims))),
                  features=frozenset(attn.FEATURES),
                  writes_lse=getattr(attn, "WRITES_LSE", True), module=module)


def _caps(device: str, module: str) -> dict[str, OpCaps]:
    caps = {
        "layer_norm": OpCaps(devices=(device,), dtypes=DTYPES, features=LAYER_NORM_FEATURES, module=module),
        "gelu": OpCaps(devices=(device,), dtypes=DTYPES, features=GELU_FEATURES, module=module),
    }
    attention = _attention_caps(device, module)
    if attention is not None:
        caps["attention"] = attention
    return caps


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
    module="fastbert.backends._cuda_device",
    caps=_caps("cuda", "fastbert.backends._cuda_device"),
    auto=tuple(op for op, ok in VERIFIED_ON_GPU.items() if ok),
    probe=_cuda_probe,
))
register_backend(BackendSpec(
    name="cuda-host",
    module="fastbert.backends._cuda_host",
    caps=_caps("cpu", "fastbert.backends._cuda_host"),
    auto=(),
    probe=_host_probe,
))
