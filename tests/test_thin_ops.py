"""The eager fast path of fastbert.ops and the remembered dispatch (issue 16's thin ops).

Plain eager calls run each custom op's implementation through one autograd.Function; anything
traced (a torch-function mode here, torch.compile elsewhere) goes through the registered custom
op. Both must agree, and the remembered backend must follow FASTBERT_BACKEND and the registry.
"""

from __future__ import annotations

import pytest
import torch
from _custom_op_path import output_and_grads

import fastbert.ops as ops
from fastbert.backends import _REGISTRY, BackendSpec, OpCaps
from fastbert.ops._dispatch import record_dispatch


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    w, b = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    res = torch.randn(6, 40, generator=g, dtype=torch.float64)
    q = torch.randn(2, 9, 3, 8, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[0, 2] = False
    return {
        "layer_norm": (lambda x, w, b, r: ops.layer_norm(x, w, b, residual=r, x_bias=b), (x, w, b, res)),
        "gelu": (lambda x, b: ops.gelu(x, bias=b), (x, b)),
        "attention": (lambda q, k, v: ops.attention(q, k, v, attention_mask=mask), (q, q * 0.5, q.flip(1))),
    }


@pytest.mark.parametrize("op", ["layer_norm", "gelu", "attention"])
def test_eager_path_matches_custom_op_path(op, poison):
    fn, inputs = _cases()[op]

    def run(mode):
        return output_and_grads(fn, inputs, lambda y: torch.ones_like(y) * 0.7 + torch.arange(y.shape[-1]) / 10, mode)

    tol = dict(atol=1e-5, rtol=1e-5)  # attention: flash backward (eager) vs composite (custom op)
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, **tol)


def test_no_grad_call_builds_no_graph():
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        y = ops.gelu(x)
    assert y.grad_fn is None and not y.requires_grad
    assert ops.gelu(x).grad_fn is not None


def test_remembered_dispatch_follows_environment_and_registry(monkeypatch):
    x = torch.randn(3, 8)
    with record_dispatch() as used:
        ops.gelu(x)
        ops.gelu(x)
    assert used["gelu"] == {"torch"}
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    with record_dispatch() as used:
        ops.gelu(x)
    assert used["gelu"] == {"reference"}
    monkeypatch.delenv("FASTBERT_BACKEND")
    spec = BackendSpec(name="_never", module="fastbert.backends.reference", caps={
        "gelu": OpCaps(devices=("cuda",), dtypes=(torch.float16,))})
    _REGISTRY[spec.name] = spec
    try:
        for _ in range(2):  # a refusal is not remembered: each call raises with its reasons
            with pytest.raises(RuntimeError, match="device 'cpu'"):
                ops.gelu(x, backend="_never")
    finally:
        _REGISTRY.pop(spec.name, None)
    with record_dispatch() as used:
        ops.gelu(x)
    assert used["gelu"] == {"torch"}
