"""The work each benchmark counts: FLOPs, bytes or tokens, one formula per op direction.

Every competitor of a case is measured against the same formula, so a rate ratio is a time ratio.

- Attention FLOPs count valid (query, key) pairs only: a padded implementation that computes
  padding rows gets no credit for them. Per head, the forward is two matmuls over the valid pairs
  (``S = Q K^T`` and ``O = P V``), ``2 * 2 * pairs * head_dim`` FLOPs; softmax is not counted.
  The backward is 2.5x the forward (five matmuls instead of two: recompute ``S``, ``dV = P^T dO``,
  ``dP = dO V^T``, ``dQ = dS K``, ``dK = dS^T Q``), the convention of FlashAttention's benchmarks.
- LayerNorm and GELU bytes count every tensor of the op's interface read or written once
  (inputs, parameters, outputs, saved statistics read by backward, gradients written); this is
  the memory traffic a perfectly fused kernel cannot avoid, so GB/s compares with the copy rate.
- The encoder counts real (non-padding) tokens: an implementation that computes padding gets no
  credit for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Work:
    """An amount of work: ``amount`` in ``unit`` ("FLOP", "B" or "token"), and its formula."""

    amount: float
    unit: str
    formula: str

    def rate(self, seconds: float) -> tuple[float, str]:
        """The rate at ``seconds`` per call: ``(value, unit)`` in TFLOP/s, GB/s or tokens/s."""
        if self.unit == "FLOP":
            return self.amount / seconds / 1e12, "TFLOP/s"
        if self.unit == "B":
            return self.amount / seconds / 1e9, "GB/s"
        return self.amount / seconds, "tokens/s"


def valid_pairs(seqlens: Sequence[int]) -> int:
    """Number of valid (query, key) pairs of self-attention over sequences of ``seqlens``."""
    return sum(int(n) * int(n) for n in seqlens)


ATTENTION_FWD_FORMULA = "4 * sum(seqlen_i^2) * num_heads * head_dim"
ATTENTION_BWD_FORMULA = "2.5 * 4 * sum(seqlen_i^2) * num_heads * head_dim"


def attention_flops(seqlens: Sequence[int], num_heads: int, head_dim: int, direction: str) -> Work:
    """Attention FLOPs over valid pairs; ``direction`` is "fwd" or "bwd" (2.5x the forward)."""
    fwd = 4.0 * valid_pairs(seqlens) * num_heads * head_dim
    if direction == "fwd":
        return Work(fwd, "FLOP", ATTENTION_FWD_FORMULA)
    return Work(2.5 * fwd, "FLOP", ATTENTION_BWD_FORMULA)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_norm_bytes(rows: int, hidden: int, dtype: torch.dtype, direction: str,
                     param_dtype: torch.dtype | None = None) -> Work:
    """Bytes of BERT's add & norm ``y = LN(x + x_bias + residual) * weight + bias``.

    fwd: read x, residual ``[rows, hidden]`` and x_bias, weight, bias ``[hidden]``; write y.
    bwd: read dy, the saved pre-norm sum h, weight, mean and rstd (fp32 ``[rows]``); write dx,
    dresidual, and dweight, dbias, dx_bias.
    """
    e, p = _size(dtype), _size(param_dtype or dtype)
    if direction == "fwd":
        return Work(float(3 * rows * hidden * e + 3 * hidden * p), "B",
                    "(x + residual + y) * rows * hidden * elem + (x_bias + weight + bias) * hidden * param_elem")
    return Work(float(4 * rows * hidden * e + 2 * rows * 4 + 4 * hidden * p), "B",
                "(dy + h + dx + dresidual) * rows * hidden * elem + (mean + rstd) * rows * 4"
                " + (weight + dweight + dbias + dx_bias) * hidden * param_elem")


def gelu_bytes(rows: int, hidden: int, dtype: torch.dtype, direction: str) -> Work:
    """Bytes of bias-GELU ``y = gelu(x + bias)``.

    fwd: read x ``[rows, hidden]`` and bias ``[hidden]``; write y. bwd: read dy, x, bias; write dx
    and dbias.
    """
    e = _size(dtype)
    if direction == "fwd":
        return Work(float(2 * rows * hidden * e + hidden * e), "B", "(x + y) * rows * hidden * elem + bias * hidden * elem")
    return Work(float(3 * rows * hidden * e + 2 * hidden * e), "B",
                "(dy + x + dx) * rows * hidden * elem + (bias + dbias) * hidden * elem")


def encoder_tokens(seqlens: Sequence[int]) -> Work:
    """Real (non-padding) tokens of one batch."""
    return Work(float(sum(int(n) for n in seqlens)), "token", "sum(seqlen_i): real tokens, padding excluded")
