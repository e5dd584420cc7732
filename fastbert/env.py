"""The environment report: what ``fastbert env`` prints and what every benchmark record carries.

:func:`collect_env` gathers versions, the device, the variables that change dispatch, and for
every registered backend and op whether it can run here and every reason why not
(``BackendSpec.reasons``), plus the CUDA build's own report. :func:`emulated_reason` is the one
place that decides whether a backend runs emulated here (its speed means nothing), for the demo
and the benchmarks alike. Printing is the command line's job (``fastbert.cli``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import platform
import re
import sys

import torch

import fastbert
from fastbert import _build_info
from fastbert.backends.cuda import NO_GPU  # one wording with the cuda backend's reason

# Names accepted for --dtype (torch's own names and the short ones).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}

# The variables that change what runs (reported as set or unset).
ENV_VARS = ("FASTBERT_BACKEND", "TRITON_INTERPRET", "FASTBERT_CHECK_INPUTS", "CUDA_VISIBLE_DEVICES")


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (a key of :data:`DTYPES`); ValueError naming ``--dtype``."""
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def emulated_reason(backend: str, device: str = "cpu") -> str | None:
    """Why ``backend`` runs emulated on ``device`` here (never timed: its speed means nothing), or None.

    Triton under ``TRITON_INTERPRET=1`` runs in its interpreter; ``cuda-host`` runs the CUDA
    kernels on the CPU through the host emulation (a test harness).
    """
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton runs in the Triton interpreter here (TRITON_INTERPRET=1)"
    if backend.endswith("-host") and device == "cpu":
        return f"{backend} runs the CUDA kernels on the CPU through the host emulation (a test harness)"
    return None


@functools.lru_cache(maxsize=1)
def nvidia_driver_found() -> bool:
    """True when an NVIDIA driver is installed: its kernel module is loaded or libcuda loads
    (checked once per process)."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def explain_reason(reason: str, driver: bool) -> str:
    """A backend's reason in a new user's words: with no NVIDIA driver at all, a CUDA runtime
    error (``cudaErrorInsufficientDriver``, ``cudaErrorNoDevice``) just means there is no GPU here.
    A driver that exists but is too old keeps the runtime's own message."""
    if not driver and (reason.startswith(NO_GPU)
                       or re.search(r"cudaError(InsufficientDriver|NoDevice)|no CUDA GPU visible", reason)):
        return NO_GPU
    return reason


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The compiled extensions fastbert env reports: every module setup.py builds by default (the CUDA
# kernels, their CPU host build for the cuda-host test backend, the torch backend's compiled
# dropout-mask generator). Never the on-request ones (the device check's harness, _C_harness): not
# here even when the manifest lists it (its build status shows in the manifest lines of the report).
EXTENSIONS = tuple(m for m in _build_info.MODULES if m not in _build_info.ON_REQUEST)


def _load(name: str):
    """Extension ``name`` as fastbert itself loads it (the module, or a str saying why it cannot be
    used: not importable, or built for another fastbert), from its one loader: the torch backend's
    :func:`~fastbert.backends._philox.compiled_generator` for ``_C_cpu``, the CUDA backend's
    :func:`~fastbert.backends.cuda._ext.load_extension` for the others."""
    if name == "_C_cpu":
        from fastbert.backends._philox import compiled_generator

        return compiled_generator()
    from fastbert.backends.cuda._ext import load_extension

    return load_extension(name)


def _extension_versions(manifest: dict) -> dict:
    """``{"fastbert._C": version or None, ...}`` for every one of :data:`EXTENSIONS`, plus
    ``"fastbert._C (why not)"`` when fastbert cannot use one: the build manifest's reason when it
    was not built, else its loader's reason (broken, or built for another fastbert; then the
    version is the one it was built for)."""
    versions: dict = {}
    for ext_name in EXTENSIONS:
        key = f"fastbert.{ext_name}"
        try:
            ext = _load(ext_name)
        except Exception as exc:  # the loaders catch ImportError; anything else is reported, never fatal here
            ext = f"fastbert.{ext_name} failed to load: {type(exc).__name__}: {exc}"
        if not isinstance(ext, str):
            versions[key] = str(ext.version())
            continue
        imported = sys.modules.get(key)  # imported, then refused: built for another fastbert
        try:
            versions[key] = str(imported.version()) if callable(getattr(imported, "version", None)) else None
        except Exception:
            versions[key] = None
        if imported is None and not _module_file_found(key):  # not built: the manifest says why
            status, reason = _build_info.module_status(ext_name, manifest)
            ext = f"not built ({status}): {reason or 'no reason recorded'}"
        versions[f"{key} (why not)"] = ext
    return versions


def _module_file_found(name: str) -> bool:
    """Whether module ``name`` exists on disk (a broken build is found, an absent one is not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda_build(driver: bool):
    """``fastbert.backends.cuda.build_info()`` when the CUDA backend exposes it, else None."""
    try:
        from fastbert.backends import cuda as cuda_backend

        build_info = getattr(cuda_backend, "build_info", None)
        info = build_info() if callable(build_info) else None
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(info, dict) and isinstance(info.get("cuda_backend_unavailable_reason"), str):
        info = dict(info, cuda_backend_unavailable_reason=explain_reason(
            info["cuda_backend_unavailable_reason"], driver))
    return info


def collect_env(device: str | None = None, dtype: str = "float32", head_dim: int = 64) -> dict:
    """What ``fastbert env`` reports, as a JSON-serialisable dict.

    Keys: ``versions`` (python, torch, triton, transformers, tokenizers, fastbert, and the
    extensions fastbert._C / fastbert._C_host / fastbert._C_cpu; None = not installed, with a
    ``"fastbert._C_cpu (why not)"`` entry saying why), ``device`` (default device,
    CPU name and torch threads, torch's CUDA version, whether an NVIDIA driver is installed, GPU
    name, compute capability and count when a GPU is visible), ``environment`` (the variables
    that change dispatch), ``call`` (the call each backend was asked about: device, dtype,
    head_dim for attention, no optional features), ``backends`` (``{name: {op: {"available":
    bool, "auto": bool, "reasons": [str]}}}``), ``auto`` (``{op: backend}`` that auto dispatch
    picks for that call, or ``"error: ..."``), ``build`` (the build manifest) and ``cuda_build``
    (``fastbert.backends.cuda.build_info()`` when the CUDA backend exposes it, else None).

    Raises:
        ValueError: ``dtype`` is not a name in :data:`DTYPES`.
    """
    from fastbert.backends import OPS, CallInfo, all_backends
    from fastbert.ops import resolve

    device = device or default_device()
    torch_dtype = dtype_from_name(dtype)
    driver = nvidia_driver_found()
    # What `pip install` built, and why anything was not (setup.py's build manifest).
    build = _build_info.read_manifest()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "triton": _version_of("triton"), "transformers": _version_of("transformers"),
                "tokenizers": _version_of("tokenizers"), "fastbert": fastbert.__version__,
                **_extension_versions(build)}
    dev = {"default": device, "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
           "cuda_available": torch.cuda.is_available(), "torch_cuda_version": torch.version.cuda,
           "nvidia_driver": driver}
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        dev["gpu"] = torch.cuda.get_device_name(idx)
        dev["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(idx)
        dev["gpu_count"] = torch.cuda.device_count()

    backends: dict = {}
    auto: dict = {}
    for op in OPS:
        call = CallInfo(op, device, torch_dtype, head_dim if op == "attention" else None)
        for name, spec in all_backends().items():
            try:
                probe = spec.probe() if op not in spec.caps else None
                # an undeclared op of an absent backend: the probe says why it is absent
                reasons = [probe] if probe else list(spec.reasons(call))
            except Exception as exc:  # a broken backend is reported, never fatal here
                reasons = [f"checking failed: {type(exc).__name__}: {exc}"]
            reasons = list(dict.fromkeys(explain_reason(r, driver) for r in reasons))
            backends.setdefault(name, {})[op] = {
                "available": not reasons, "auto": op in spec.auto, "reasons": reasons}
        try:
            auto[op] = resolve(call, "auto")
        except Exception as exc:
            auto[op] = f"error: {exc}"

    return {"versions": versions, "device": dev,
            "environment": {k: os.environ.get(k) for k in ENV_VARS},
            "call": {"device": device, "dtype": str(torch_dtype).replace("torch.", ""),
                     "head_dim": head_dim},
            "backends": backends, "auto": auto, "build": build, "cuda_build": _cuda_build(driver)}


def short_kernel(name: str) -> str:
    """A demangled kernel name without namespaces, ``void`` and the parameter list."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"\b\w+::", "", name)
    return re.sub(r"\([^()<>]*\)$", "", name)


def summarise_ptxas(rows: list[dict]) -> list[dict]:
    """One row per kernel template and arch from ptxas records (``kernel``, ``arch``,
    ``registers``, ``stack_bytes``, ``spill_store_bytes``, ``spill_load_bytes``, ``smem_bytes``):
    ``{"kernel", "arch", "variants", "registers" ("min-max"), "stack_bytes", "spill_bytes"
    (stores + loads), "smem_bytes"}`` (the last three: the maximum over the variants)."""
    groups: dict = {}
    for row in rows:
        base = re.sub(r"<.*$", "", short_kernel(str(row.get("kernel", ""))))
        groups.setdefault((base, str(row.get("arch", ""))), []).append(row)

    def top(group, *keys):
        return max(sum(int(r.get(k) or 0) for k in keys) for r in group)

    out = []
    for (kernel, arch), group in groups.items():
        regs = [int(r.get("registers") or 0) for r in group]
        out.append({"kernel": kernel, "arch": arch, "variants": len(group),
                    "registers": f"{min(regs)}-{max(regs)}" if min(regs) != max(regs) else str(regs[0]),
                    "stack_bytes": top(group, "stack_bytes"),
                    "spill_bytes": top(group, "spill_store_bytes", "spill_load_bytes"),
                    "smem_bytes": top(group, "smem_bytes")})
    return out

