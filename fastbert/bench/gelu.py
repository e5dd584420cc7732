"""GELU benchmarks: bias-GELU ``y = gelu(x + bias)`` (exact erf form) on BERT's intermediate
activations ``(tokens, intermediate_size)``; the competitor is Hugging Face's
``BertIntermediate`` composite ``F.gelu(x + bias)`` in eager mode and under ``torch.compile``."""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from fastbert.backends import CallInfo
from fastbert.backends.reference import gelu_math
from fastbert.bench.core import MODEL_SHAPES, Case, Options, Prepared, elementwise_impls
from fastbert.bench.formulas import gelu_bytes
from fastbert.bench.layer_norm import row_sizes


def eager_bias_gelu(x, bias):
    """The composite a user writes (the dense layer's bias, then the activation)."""
    return F.gelu(x + bias)


def reference_bias_gelu(x, bias):
    """The reference math: exact erf GELU of ``x + bias`` (Hendrycks & Gimpel 2016)."""
    return gelu_math(x + bias)


class _Inputs:
    def __init__(self, rows, hidden, dtype, device, seed):
        self.rows, self.hidden, self.dtype, self.device, self.seed = rows, hidden, dtype, device, seed

    @cached_property
    def tensors(self):
        """x, bias, dy with fresh random values."""
        g = torch.Generator().manual_seed(self.seed)
        shapes = [(self.rows, self.hidden), (self.hidden,), (self.rows, self.hidden)]
        return [torch.randn(s, generator=g).to(self.device, self.dtype) for s in shapes]

    def reference(self, direction, dtype, composite):
        x, b, dy = (t.to(dtype) for t in self.tensors)
        if direction == "fwd":
            return composite(x, b)
        x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
        return torch.autograd.grad(composite(x, b), (x, b), dy)


def _prepare(inp: _Inputs, fn, direction: str) -> Prepared:
    x, b, dy = inp.tensors
    if direction == "fwd":
        return Prepared(run=lambda: fn(x, b), result=lambda: fn(x, b))
    x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
    y = fn(x, b)

    def run():
        x.grad = b.grad = None
        y.backward(dy, retain_graph=True)

    def result():
        run()
        return x.grad, b.grad

    return Prepared(run=run, result=result)


def _fastbert_fn(backend):
    from fastbert.ops import gelu

    def fn(x, bias):
        return gelu(x, bias=bias, backend=backend)
    return fn


def cases(opts: Options) -> list[Case]:
    """Every bias-GELU case of ``opts``: model shapes x row counts x directions."""
    out = []
    gpu = opts.device != "cpu"
    for model in opts.models:
        hidden = MODEL_SHAPES[model].intermediate_size
        for rows in row_sizes(opts):
            inp = _Inputs(rows, hidden, opts.dtype, opts.device, opts.seed)
            for direction in opts.directions:
                call = CallInfo("gelu", torch.device(opts.device).type, opts.dtype, None, frozenset({"bias"}))
                impls = elementwise_impls(call, opts, lambda fn, d=direction, i=inp: _prepare(i, fn, d),
                                          _fastbert_fn, eager_bias_gelu)
                hi = torch.float32 if gpu else torch.float64
                out.append(Case(
                    op="gelu", direction=direction, label=f"{model} rows{rows} hidden{hidden}",
                    params=dict(model=model, rows=rows, hidden=hidden, approximate="none"),
                    x=rows, x_name="rows (tokens)", dtype=opts.dtype, device=opts.device,
                    work=gelu_bytes(rows, hidden, opts.dtype, direction),
                    reference=lambda i=inp, d=direction, h=hi: (i.reference(d, h, reference_bias_gelu),
                                                                 i.reference(d, i.dtype, eager_bias_gelu)),
                    impls=impls))
    return out
