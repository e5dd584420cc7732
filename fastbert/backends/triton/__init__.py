"""Triton backend: registration and declared capabilities (one compute module per op: attention.py,
layer_norm.py, gelu.py, geglu.py, rotary.py).

Importing this package does not import Triton; an op's compute module does, on first use.
On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set before importing), which is
how CI tests them; the dispatcher never picks Triton on the CPU by itself.
"""

from __future__ import annotations

import os

import torch

from fastbert.backends import ALL_FEATURES, WINDOW_FEATURE, BackendSpec, OpCaps, register_backend

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# head_dims the attention kernels take: every multiple of 8 up to 256 (padded lanes masked inside
# power-of-two buckets). One list feeds capabilities, tests and docs.
ATTENTION_HEAD_DIMS = tuple(range(8, 257, 8))


def _probe() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # no Triton: the backend is unavailable, never an import error
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing fastbert to interpret on the CPU)"
    return None


register_backend(BackendSpec(
    name="triton",
    module=None,  # one compute module per op (OpCaps.module)
    caps={
        "attention": OpCaps(devices=_DEVICES, dtypes=_DTYPES,
                            head_dims=lambda d: d in ATTENTION_HEAD_DIMS,
                            head_dims_doc="multiples of 8 up to 256",
                            features=ALL_FEATURES | {WINDOW_FEATURE},  # + the local window
                            module="fastbert.backends.triton.attention"),
        "layer_norm": OpCaps(devices=_DEVICES, dtypes=_DTYPES, features=ALL_FEATURES,
                             module="fastbert.backends.triton.layer_norm"),
        "gelu": OpCaps(devices=_DEVICES, dtypes=_DTYPES, features=ALL_FEATURES,
                       module="fastbert.backends.triton.gelu"),
        "geglu": OpCaps(devices=_DEVICES, dtypes=_DTYPES, features=ALL_FEATURES,
                        module="fastbert.backends.triton.geglu"),
        "rotary": OpCaps(devices=_DEVICES, dtypes=_DTYPES, features=ALL_FEATURES,  # any head_dim
                         module="fastbert.backends.triton.rotary"),
    },
    auto=("attention", "layer_norm", "gelu", "geglu", "rotary"),
    probe=_probe,
))
