"""Dispatch by declared capability (after xformers' fmha dispatch).

Order: the ``backend=`` argument > the ``FASTBERT_BACKEND`` environment variable > auto. Auto walks
a priority list (CPU: torch; GPU: triton, then cuda once verified for the op, then torch) and takes
the first backend whose ``reasons()`` is empty, logging once per (op, backend) when it falls back. A
forced backend that cannot take the call raises ``RuntimeError`` listing every reason.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from fastbert.backends import _REGISTRY, CallInfo, all_backends, get_backend, preload

logger = logging.getLogger("fastbert")

AUTO_ORDER = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}
_logged: set = set()
_recorders: list[dict] = []  # open record_dispatch() blocks; empty (the normal case) costs nothing

preload()  # compute modules imported before any call can be traced by torch.compile


def _log_once(key, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(msg)


@contextlib.contextmanager
def record_dispatch():
    """Record which backend :func:`resolve` picks for each op while the block runs.

    Yields ``{op: {backend name, ...}}``, filled as calls resolve (what actually ran, not what was
    expected to run; ``fastbert demo`` reports it). Blocks may nest; each sees every call.
    """
    used: dict[str, set] = {}
    _recorders.append(used)
    try:
        yield used
    finally:
        _recorders.remove(used)


def resolve(call: CallInfo, backend: str | None = None) -> str:
    """Name of the backend that runs ``call``.

    Raises:
        ValueError: ``backend`` (or ``FASTBERT_BACKEND``) names no registered backend.
        RuntimeError: a forced backend cannot take the call (every reason listed), or, in auto
            mode, no backend can.
    """
    name = _resolve(call, backend)
    for used in _recorders:
        used.setdefault(call.op, set()).add(name)
    return name


# (op, device, dtype, head_dim, features, backend=, env) -> name; emptied when the registry changes
_RESOLVED: dict = _REGISTRY.invalidates({})
_ENV_NAME = "FASTBERT_BACKEND"
_is_compiling = torch.compiler.is_compiling  # bound once (two attribute lookups a call); Dynamo folds it
_ENV_KEY = os.environ.encodekey(_ENV_NAME) if hasattr(os.environ, "encodekey") else None


def _env_backend():
    """``FASTBERT_BACKEND`` as a cache key: its raw (encoded) value from ``os.environ``'s own dict,
    one dict lookup (``os.environ.get`` encodes the name and, when it is unset, raises and
    catches a KeyError: a microsecond per call). The same value ``os.environ`` holds, so
    ``monkeypatch.setenv`` and ``os.environ[...] = ...`` are seen at once."""
    data = getattr(os.environ, "_data", None)
    if _ENV_KEY is not None and type(data) is dict:
        return data.get(_ENV_KEY)
    return os.environ.get(_ENV_NAME)


def resolve_call(op: str, device: str, dtype: torch.dtype, head_dim: int | None, features: tuple,
                 backend: str | None = None) -> str:
    """:func:`resolve` of ``CallInfo(op, device, dtype, head_dim, frozenset(features))``, the answer
    remembered per key (``FASTBERT_BACKEND`` in the key; forgotten when a backend is registered), so a
    repeated call builds no ``CallInfo`` and walks no reasons. Refusals are not remembered: each
    raises with every reason, as :func:`resolve` does. Not cached while compiling (Dynamo traces
    the plain path)."""
    if _is_compiling():
        return resolve(CallInfo(op, device, dtype, head_dim, frozenset(features)), backend)
    key = (op, device, dtype, head_dim, features, backend, _env_backend())
    try:
        name = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend= (a list): _resolve's error names it
        return _resolve(CallInfo(op, device, dtype, head_dim, frozenset(features)), backend)
    if name is None:
        name = _resolve(CallInfo(op, device, dtype, head_dim, frozenset(features)), backend)
        _RESOLVED[key] = name
    for used in _recorders:
        used.setdefault(op, set()).add(name)
    return name


def _resolve(call: CallInfo, backend: str | None) -> str:
    forced = backend or os.environ.get(_ENV_NAME) or None
    if forced is not None and forced != "auto":
        spec = get_backend(forced, "backend" if backend else "FASTBERT_BACKEND (environment variable)")
        reasons = spec.reasons(call)
        if reasons:
            source = "backend=" if backend else "FASTBERT_BACKEND="
            raise RuntimeError(
                f"fastbert.ops.{call.op}: {source}{forced!r} cannot run this call "
                f"(device={call.device}, dtype={call.dtype}, head_dim={call.head_dim}, "
                f"features={sorted(call.features)}):\n  - " + "\n  - ".join(reasons))
        return forced
    tried: list[str] = []
    for name in AUTO_ORDER.get(call.device, ("torch",)):
        spec = all_backends().get(name)
        if spec is None or call.op not in spec.auto:
            continue
        reasons = spec.reasons(call)
        if not reasons:
            if tried:
                _log_once((call.op, name, tuple(tried)),
                          f"fastbert.ops.{call.op}: using {name!r}; skipped: {'; '.join(tried)}")
            return name
        tried.append(f"{name}: {', '.join(reasons)}")
    raise RuntimeError(f"fastbert.ops.{call.op}: no backend can run this call:\n  - " + "\n  - ".join(tried))


_MODULES: dict = _REGISTRY.invalidates({})  # (name, op) -> compute module


def backend_module(name: str, op: str):
    """The compute module of backend ``name`` for ``op`` (loaded once; remembered until the
    registry changes: forward and backward ask on every call)."""
    mod = _MODULES.get((name, op))
    if mod is None:
        mod = get_backend(name).load(op)
        if isinstance(mod, str):
            raise RuntimeError(f"fastbert.ops.{op}: backend {name!r} is unavailable: {mod}")
        _MODULES[(name, op)] = mod
    return mod


_FUSES_DENSE_BIAS: dict = _REGISTRY.invalidates({})


def fuses_dense_bias(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether a dense layer before a LayerNorm / GELU on ``x`` should leave its bias to that op.

    The backend that would run ``layer_norm`` on ``x`` (same order as :func:`resolve`) declares
    it (``BackendSpec.fuses_dense_bias``): True for the kernel backends, False for torch, where
    ``addmm`` adds the bias inside the GEMM. Decided once per (device, dtype, backend,
    ``FASTBERT_BACKEND``) and remembered until the registry changes; modules call this instead of
    checking devices.
    """
    key = (x.device.type, x.dtype, backend, _env_backend())
    hit = _FUSES_DENSE_BIAS.get(key)
    if hit is None:
        call = CallInfo(op="layer_norm", device=x.device.type, dtype=x.dtype,
                        features=frozenset({"x_bias", "residual", "weight", "bias"}))
        hit = get_backend(resolve(call, backend)).fuses_dense_bias
        if not torch.compiler.is_compiling():
            _FUSES_DENSE_BIAS[key] = hit
    return hit
