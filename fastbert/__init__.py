"""fastbert: fast BERT encoders on NVIDIA GPUs, correct everywhere.

Fused masked multi-head attention, LayerNorm (with BERT's bias + dropout + residual fusion) and
GELU (with bias) behind one differentiable API (:mod:`fastbert.ops`), drop-in modules
(:mod:`fastbert.nn`) and a full BERT encoder (:mod:`fastbert.models`).
"""

__version__ = "0.1.0"

from fastbert.ops import attention, gelu, layer_norm  # noqa: E402

__all__ = ["__version__", "attention", "layer_norm", "gelu"]
