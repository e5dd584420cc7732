"""LayerNorm benchmarks: BERT's add & norm ``y = LN(x + x_bias + residual) * weight + bias``.

fastbert fuses the bias and residual adds into the normalisation; the competitor is what
Hugging Face's ``BertSelfOutput``/``BertOutput`` run: ``F.layer_norm(x + x_bias + residual)`` in
eager mode, and that composite under ``torch.compile``. GB/s counts the op's interface tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert.backends.reference import add_dropout_residual, layer_norm_math
from fastbert.bench.core import Case, Options, Prepared, RowInputs, elementwise_cases, prepare_timed
from fastbert.bench.formulas import layer_norm_bytes

EPS = 1e-12  # BERT's layer_norm_eps


def eager_add_norm(x, residual, x_bias, weight, bias):
    """The composite a user writes (Hugging Face's BertSelfOutput after its dense layer)."""
    return F.layer_norm(x + x_bias + residual, (x.shape[-1],), weight, bias, EPS)


class _Inputs(RowInputs):
    def draw(self, g):
        """x, residual, x_bias, weight, bias, dy with fresh random values."""
        r, h = self.rows, self.hidden
        shapes = [(r, h), (r, h), (h,), (h,), (h,), (r, h)]
        ts = [torch.randn(s, generator=g) for s in shapes]
        ts[3] = 1.0 + 0.1 * ts[3]  # weight near 1, as trained LayerNorms are
        return ts

    def reference(self, direction, dtype, composite):
        x, res, xb, w, b, dy = (t.to(dtype) for t in self.tensors)
        leaves = (x, res, xb, w, b)
        if direction == "bwd":
            leaves = tuple(t.detach().requires_grad_() for t in leaves)
        y = composite(*leaves)
        if direction == "fwd":
            return y
        return torch.autograd.grad(y, leaves, dy)


def reference_add_norm(x, residual, x_bias, weight, bias):
    """fastbert's reference math (two-pass fp32/fp64 statistics), differentiable by autograd."""
    return layer_norm_math(add_dropout_residual(x, residual, x_bias), weight, bias, EPS)[0]


def _prepare(inp: _Inputs, fn, direction: str) -> Prepared:
    x, res, xb, w, b, dy = inp.tensors
    leaves = (x, res, xb, w, b)
    if direction == "bwd":
        leaves = tuple(t.detach().requires_grad_() for t in leaves)
    return prepare_timed(lambda: fn(*leaves), leaves, dy, direction)


def _fastbert_fn(backend):
    from fastbert.ops import layer_norm

    def fn(x, residual, x_bias, weight, bias):
        return layer_norm(x, weight, bias, eps=EPS, residual=residual, x_bias=x_bias, backend=backend)
    return fn


def cases(opts: Options) -> list[Case]:
    """Every add & norm case of ``opts``: model shapes x row counts x directions."""
    return elementwise_cases(opts, "layer_norm", frozenset({"weight", "bias", "residual", "x_bias"}),
                             lambda shape: shape.hidden_size, _Inputs, _prepare, _fastbert_fn, eager_add_norm,
                             reference_add_norm, layer_norm_bytes, dict(eps=EPS))
