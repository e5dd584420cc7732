"""fastbert: fast BERT encoders on NVIDIA GPUs, correct everywhere.

Fused masked multi-head attention, LayerNorm (with BERT's bias + dropout + residual fusion) and
GELU (with bias) behind one differentiable API (:mod:`fastbert.ops`), drop-in modules
(:mod:`fastbert.nn`) and a full BERT encoder (:mod:`fastbert.models`).

``import fastbert`` imports torch and the ops only; the other subpackages load on first use
(``fastbert.models`` then imports transformers), so the torch-only layers never need it.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from fastbert.ops import attention, gelu, layer_norm  # noqa: E402

__all__ = ["__version__", "attention", "layer_norm", "gelu"]

# Subpackages and modules reachable as attributes of the package without an explicit import.
_LAZY = ("backends", "ops", "nn", "models", "integrations", "bench", "env", "demo", "cli")


def __getattr__(name: str):
    """``fastbert.models`` and the like: import the submodule on first attribute access (PEP 562)."""
    if name in _LAZY:
        return importlib.import_module(f"fastbert.{name}")
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
