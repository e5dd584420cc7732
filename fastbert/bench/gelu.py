"""GELU benchmarks: bias-GELU ``y = gelu(x + bias)`` (exact erf form) on BERT's intermediate
activations ``(tokens, intermediate_size)``; the competitor is Hugging Face's
``BertIntermediate`` composite ``F.gelu(x + bias)`` in eager mode and under ``torch.compile``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert.backends.reference import gelu_math
from fastbert.bench.core import Case, Options, Prepared, RowInputs, elementwise_cases, prepare_timed
from fastbert.bench.formulas import gelu_bytes


def eager_bias_gelu(x, bias):
    """The composite a user writes (the dense layer's bias, then the activation)."""
    return F.gelu(x + bias)


def reference_bias_gelu(x, bias):
    """The reference math: exact erf GELU of ``x + bias`` (Hendrycks & Gimpel 2016)."""
    return gelu_math(x + bias)


class _Inputs(RowInputs):
    def draw(self, g):
        """x, bias, dy with fresh random values."""
        shapes = [(self.rows, self.hidden), (self.hidden,), (self.rows, self.hidden)]
        return [torch.randn(s, generator=g) for s in shapes]

    def reference(self, direction, dtype, composite):
        x, b, dy = (t.to(dtype) for t in self.tensors)
        if direction == "fwd":
            return composite(x, b)
        x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
        return torch.autograd.grad(composite(x, b), (x, b), dy)


def _prepare(inp: _Inputs, fn, direction: str) -> Prepared:
    x, b, dy = inp.tensors
    if direction == "bwd":
        x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
    return prepare_timed(lambda: fn(x, b), (x, b), dy, direction)


def _fastbert_fn(backend):
    from fastbert.ops import gelu

    def fn(x, bias):
        return gelu(x, bias=bias, backend=backend)
    return fn


def cases(opts: Options) -> list[Case]:
    """Every bias-GELU case of ``opts``: model shapes x row counts x directions."""
    return elementwise_cases(opts, "gelu", frozenset({"bias"}), lambda shape: shape.intermediate_size, _Inputs,
                             _prepare, _fastbert_fn, eager_bias_gelu, reference_bias_gelu, gelu_bytes,
                             dict(approximate="none"))
