"""Dispatch by declared capability: order, forced backends, reasons, environment override."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert.backends import ALL_FEATURES, BackendSpec, CallInfo, OpCaps, all_backends, register_backend
from fastbert.ops import attention, resolve


def test_auto_on_cpu_picks_torch():
    for op in ("attention", "layer_norm", "gelu"):
        assert resolve(CallInfo(op, "cpu", torch.float32, 64 if op == "attention" else None)) == "torch"


def test_forced_backend_that_cannot_run_lists_every_reason():
    spec = BackendSpec(name="_narrow", module="fastbert.backends.reference", caps={
        "attention": OpCaps(devices=("cuda",), dtypes=(torch.float16,), head_dims=lambda d: d == 64,
                            head_dims_doc="64", features=frozenset())})
    register_backend(spec)
    try:
        q = torch.randn(1, 3, 2, 40)
        with pytest.raises(RuntimeError) as info:
            attention(q, q, q, attention_mask=torch.ones(1, 3), backend="_narrow")
        msg = str(info.value)
        for part in ("device 'cpu'", "dtype torch.float32", "head_dim 40 not supported (supports 64)",
                     "features not supported: attention_mask"):
            assert part in msg, msg
    finally:
        from fastbert.backends import _REGISTRY

        _REGISTRY.pop("_narrow", None)


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert resolve(CallInfo("gelu", "cpu", torch.float32)) == "reference"
    monkeypatch.setenv("FASTBERT_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"FASTBERT_BACKEND \(environment variable\): expected one of \[.*'torch'.*\] "
                                         r"or 'auto', got 'nope'"):
        resolve(CallInfo("gelu", "cpu", torch.float32))
    # the argument wins over the environment
    assert resolve(CallInfo("gelu", "cpu", torch.float32), backend="torch") == "torch"


def test_unavailable_backends_say_why():
    for name, spec in all_backends().items():
        for op in ("attention", "layer_norm", "gelu"):
            reasons = spec.reasons(CallInfo(op, "cpu", torch.float32, 64 if op == "attention" else None))
            assert all(isinstance(r, str) and r for r in reasons), (name, op, reasons)


def test_reference_declares_every_feature():
    caps = all_backends()["reference"].caps
    assert all(c.features >= ALL_FEATURES for c in caps.values())
    assert "window" in caps["attention"].features  # opt-in, not in ALL_FEATURES


def test_import_never_fails_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fastbert, torch\n"
            "from fastbert.backends import all_backends, CallInfo\n"
            "r = all_backends()['triton'].reasons(CallInfo('gelu', 'cpu', torch.float32))\n"
            "print(r)\n"
            "assert r and 'triton' in r[0], r\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_compile_fullgraph_in_a_fresh_process():
    """No eager call first: dispatch must not import a backend module while Dynamo traces."""
    code = ("import torch, fastbert\n"
            "q = torch.randn(2, 5, 2, 8)\n"
            "m = torch.ones(2, 5, dtype=torch.bool)\n"
            "f = torch.compile(lambda q: fastbert.gelu(fastbert.layer_norm(fastbert.attention(q, q, q, "
            "attention_mask=m))), fullgraph=True, backend='aot_eager')\n"
            "torch.testing.assert_close(f(q), fastbert.gelu(fastbert.layer_norm(fastbert.attention(q, q, q, "
            "attention_mask=m))))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_compile_with_changing_float_arguments():
    """After a recompile Dynamo passes floats symbolically: checks and messages must still work."""
    x = torch.randn(4, 16)
    q = torch.randn(1, 3, 2, 8)

    def f(x, q, p, eps, scale):
        return (fastbert.layer_norm(x, eps=eps, dropout_p=p),
                fastbert.attention(q, q, q, dropout_p=p, softmax_scale=scale))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for p, eps, scale in [(0.1, 1e-5, 0.3), (0.2, 1e-6, 0.4), (0.3, 1e-7, 0.5)]:
        torch.manual_seed(0)
        got = cf(x, q, p, eps, scale)
        torch.manual_seed(0)
        want = f(x, q, p, eps, scale)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_remembered_answers_follow_every_registry_change(monkeypatch):
    """resolve_call and backend_module forget their answers on every registry change: registering, replacing
    (same name, new spec), writing the dict directly and removing a backend are all seen at once."""
    from fastbert.backends import _REGISTRY
    from fastbert.ops._dispatch import backend_module, resolve_call

    def spec(dtypes, module="fastbert.backends.reference"):
        return BackendSpec(name="_swap", module=module, caps={"gelu": OpCaps(devices=("cpu",), dtypes=dtypes)})
    v = _REGISTRY.version
    register_backend(spec((torch.float16,)))
    try:
        assert _REGISTRY.version > v
        with pytest.raises(RuntimeError, match="dtype torch.float32"):
            resolve_call("gelu", "cpu", torch.float32, None, (), "_swap")
        assert backend_module("_swap", "gelu").__name__ == "fastbert.backends.reference"  # remembered
        register_backend(spec((torch.float32,), "fastbert.backends.torch"))  # replaced under the same name
        assert resolve_call("gelu", "cpu", torch.float32, None, (), "_swap") == "_swap"
        assert backend_module("_swap", "gelu").__name__ == "fastbert.backends.torch"
        monkeypatch.setitem(_REGISTRY, "_swap", spec((torch.float16,)))
        with pytest.raises(RuntimeError, match="dtype torch.float32"):
            resolve_call("gelu", "cpu", torch.float32, None, (), "_swap")
        assert backend_module("_swap", "gelu").__name__ == "fastbert.backends.reference"
        monkeypatch.undo()
    finally:
        _REGISTRY.pop("_swap", None)
    with pytest.raises(ValueError, match="_swap"):
        resolve_call("gelu", "cpu", torch.float32, None, (), "_swap")
    with pytest.raises(ValueError, match="_swap"):
        backend_module("_swap", "gelu")


def test_dense_bias_decision_follows_a_replaced_backend():
    """fuses_dense_bias remembers its answer per (device, dtype, backend, env) only until the
    registry changes: a backend replaced under the same name with the other declaration is seen."""
    from fastbert.backends import _REGISTRY
    from fastbert.ops import fuses_dense_bias

    def spec(fuses):
        caps = {"layer_norm": OpCaps(devices=("cpu",), dtypes=(torch.float32,),
                                     features=frozenset({"x_bias", "residual", "weight", "bias"}))}
        return BackendSpec(name="_swap_bias", module="fastbert.backends.torch", caps=caps, fuses_dense_bias=fuses)
    x = torch.randn(3)
    try:
        register_backend(spec(True))
        assert fuses_dense_bias(x, "_swap_bias") is True
        register_backend(spec(False))
        assert fuses_dense_bias(x, "_swap_bias") is False
    finally:
        _REGISTRY.pop("_swap_bias", None)
