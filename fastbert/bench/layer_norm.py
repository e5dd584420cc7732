"""LayerNorm benchmarks: BERT's add & norm ``y = LN(x + x_bias + residual) * weight + bias``.

fastbert fuses the bias and residual adds into the normalisation; the competitor is what
Hugging Face's ``BertSelfOutput``/``BertOutput`` run: ``F.layer_norm(x + x_bias + residual)`` in
eager mode, and that composite under ``torch.compile``. GB/s counts the op's interface tensors.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from fastbert.backends import CallInfo
from fastbert.backends.reference import add_dropout_residual, layer_norm_math
from fastbert.bench.core import MODEL_SHAPES, Case, Options, Prepared, elementwise_impls
from fastbert.bench.formulas import layer_norm_bytes

EPS = 1e-12  # BERT's layer_norm_eps


def row_sizes(opts: Options) -> tuple[int, ...]:
    """Row counts (tokens) to sweep."""
    if opts.rows:
        return opts.rows
    if opts.device != "cpu":
        return (8192, 65536) if opts.quick else (2048, 8192, 32768, 131072)
    return (256, 1024) if opts.quick else (1024, 4096, 16384)


def eager_add_norm(x, residual, x_bias, weight, bias):
    """The composite a user writes (Hugging Face's BertSelfOutput after its dense layer)."""
    return F.layer_norm(x + x_bias + residual, (x.shape[-1],), weight, bias, EPS)


class _Inputs:
    def __init__(self, rows, hidden, dtype, device, seed):
        self.rows, self.hidden, self.dtype, self.device, self.seed = rows, hidden, dtype, device, seed

    @cached_property
    def tensors(self):
        """x, residual, x_bias, weight, bias, dy with fresh random values."""
        g = torch.Generator().manual_seed(self.seed)
        r, h = self.rows, self.hidden
        shapes = [(r, h), (r, h), (h,), (h,), (h,), (r, h)]
        ts = [torch.randn(s, generator=g) for s in shapes]
        ts[3] = 1.0 + 0.1 * ts[3]  # weight near 1, as trained LayerNorms are
        return [t.to(self.device, self.dtype) for t in ts]

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
    if direction == "fwd":
        return Prepared(run=lambda: fn(*leaves), result=lambda: fn(*leaves))
    leaves = tuple(t.detach().requires_grad_() for t in leaves)
    y = fn(*leaves)

    def run():
        for t in leaves:
            t.grad = None
        y.backward(dy, retain_graph=True)

    def result():
        run()
        return tuple(t.grad for t in leaves)

    return Prepared(run=run, result=result)


def _fastbert_fn(backend):
    from fastbert.ops import layer_norm

    def fn(x, residual, x_bias, weight, bias):
        return layer_norm(x, weight, bias, eps=EPS, residual=residual, x_bias=x_bias, backend=backend)
    return fn


def cases(opts: Options) -> list[Case]:
    """Every add & norm case of ``opts``: model shapes x row counts x directions."""
    out = []
    gpu = opts.device != "cpu"
    for model in opts.models:
        hidden = MODEL_SHAPES[model].hidden_size
        for rows in row_sizes(opts):
            inp = _Inputs(rows, hidden, opts.dtype, opts.device, opts.seed)
            for direction in opts.directions:
                call = CallInfo("layer_norm", torch.device(opts.device).type, opts.dtype, None,
                                frozenset({"weight", "bias", "residual", "x_bias"}))
                impls = elementwise_impls(call, opts, lambda fn, d=direction, i=inp: _prepare(i, fn, d),
                                          _fastbert_fn, eager_add_norm)
                hi = torch.float32 if gpu else torch.float64
                out.append(Case(
                    op="layer_norm", direction=direction, label=f"{model} rows{rows} hidden{hidden}",
                    params=dict(model=model, rows=rows, hidden=hidden, eps=EPS),
                    x=rows, x_name="rows (tokens)", dtype=opts.dtype, device=opts.device,
                    work=layer_norm_bytes(rows, hidden, opts.dtype, direction),
                    reference=lambda i=inp, d=direction, h=hi: (i.reference(d, h, reference_add_norm),
                                                                 i.reference(d, i.dtype, eager_add_norm)),
                    impls=impls))
    return out
