"""Numerics helpers shared by the composite math modules (``_composite`` and its per-op
``_composite_*`` siblings) and the ``torch`` backend."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (the contract's numerics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to(x, dtype):
    """``x`` rounded to ``dtype`` and back: where the kernels feed a low-precision operand to a
    matrix product (P before ``P @ V``, dS before ``dS @ K``), accumulating in fp32."""
    return x.to(dtype).to(x.dtype)
