"""Shared pieces of the ops layer: argument checks, output allocation, dropout seeds, numerics flags."""

from __future__ import annotations

import contextlib
import os

import torch

from fastbert.backends import set_workspace_allocator

_POISON = os.environ.get("FASTBERT_POISON_OUTPUTS") == "1"


def set_poison_outputs(enabled: bool) -> bool:
    """Fill every output and workspace with NaN (ints with -1) before a backend writes it.

    A test switch: an element a kernel forgets to write then fails parity. Returns the old value.
    """
    global _POISON
    old, _POISON = _POISON, bool(enabled)
    return old


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Context manager form of :func:`set_poison_outputs`."""
    old = set_poison_outputs(enabled)
    try:
        yield
    finally:
        set_poison_outputs(old)


def new_empty(shape, dtype, device) -> torch.Tensor:
    """Allocate an output/workspace; poisoned when the test switch is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


set_workspace_allocator(new_empty)  # backends' scratch memory comes from here too


def check(cond: bool, exc: type[Exception], msg: str) -> None:
    """Raise ``exc(msg)`` unless ``cond``."""
    if not cond:
        raise exc(msg)


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None) -> None:
    """Metadata checks that name the argument, the expected and the actual value."""
    check(isinstance(t, torch.Tensor), TypeError, f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = ndim if isinstance(ndim, tuple) else (ndim,)
        check(t.dim() in allowed, ValueError,
              f"{name}: expected {' or '.join(map(str, allowed))} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if dtypes is not None:
        check(t.dtype in dtypes, TypeError,
              f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        check(t.device == device, ValueError, f"{name}: expected device {device}, got {t.device}")


def check_vector(name: str, t, *, size: int, x: torch.Tensor) -> torch.Tensor:
    """A ``(size,)`` parameter of x's dtype or fp32 on x's device; returns it contiguous.

    Every backend then reads it as a plain array: a strided or expanded (stride-0) view costs one
    copy of ``size`` elements here instead of a stride argument in every kernel.
    """
    check_tensor(name, t, ndim=1, device=x.device)
    check(t.shape[0] == size, ValueError, f"{name}: expected shape ({size},), got {tuple(t.shape)}")
    allowed = list(dict.fromkeys((x.dtype, torch.float32)))
    check(t.dtype in allowed, TypeError,
          f"{name}: expected dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    return t.contiguous()


def as_float(name: str, value) -> float:
    """A Python float from an int/float argument.

    Under ``torch.compile`` a float argument can arrive symbolic (Dynamo makes it dynamic after a
    recompile); ``float()`` specializes it so checks and messages see a plain number.
    """
    check(isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool),
          TypeError, "%s: expected a float, got %s" % (name, type(value).__name__))
    return float(value)


def check_dropout_p(dropout_p) -> float:
    """Validate ``0 <= dropout_p < 1``; returns it as a float."""
    p = as_float("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {p!r}")
    return p


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Value checks (which read tensor data) run for CPU tensors or with FASTBERT_CHECK_INPUTS=1,
    never while compiling or capturing a CUDA graph: the fast path trusts its inputs."""
    if torch.compiler.is_compiling():
        return False
    if any(t.device.type == "cuda" for t in tensors if t is not None):
        if torch.cuda.is_current_stream_capturing():
            return False
        return os.environ.get("FASTBERT_CHECK_INPUTS") == "1"
    return True


def draw_seed(device: torch.device) -> torch.Tensor:
    """Two uint32 Philox key words as int64 ``[2]`` on ``device``, from torch's RNG.

    A torch RNG op: reproduced by ``torch.manual_seed``, graph-safe, replayed by activation
    checkpointing (which restores the RNG state).
    """
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def allow_tf32(t: torch.Tensor) -> bool:
    """Whether fp32 matmuls may use TF32, from torch's matmul precision setting (IEEE by default)."""
    return t.dtype == torch.float32 and t.device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"


def deterministic() -> bool:
    """``torch.are_deterministic_algorithms_enabled()``, passed down to the backends."""
    return torch.are_deterministic_algorithms_enabled()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type`` when autocast is on there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@contextlib.contextmanager
def no_autocast(device_type: str):
    """Backends compute in the dtypes ops/ chose: autocast off inside the custom ops."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield
