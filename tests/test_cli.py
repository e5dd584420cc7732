"""The ``fastbert`` command line: env, bench forwarding, --version, and the demo (real checkpoint)."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert.backends import OPS, BackendSpec, OpCaps, all_backends
from fastbert.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def broken_backend(monkeypatch):
    """A registered backend that cannot run anywhere, with a known reason."""
    import fastbert.backends as backends

    spec = BackendSpec(name="test-broken", module=None,
                       caps={"gelu": OpCaps(devices=("cpu",), dtypes=(torch.float32,))},
                       probe=lambda: "test-broken: needs hardware that does not exist")
    monkeypatch.setitem(backends._REGISTRY, spec.name, spec)
    return spec


def test_env_json_lists_every_backend_and_op_with_reasons(capsys, broken_backend):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["fastbert"] == fastbert.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["device"]["default"] == "cpu"
    assert set(info["backends"]) == set(all_backends())
    for name, ops in info["backends"].items():
        assert set(ops) == set(OPS), name
        for op, status in ops.items():
            # an unavailable backend always says why; an available one has nothing to say
            assert status["available"] == (not status["reasons"]), (name, op, status)
    for op in OPS:  # the arbiter runs everywhere; auto on the CPU is the torch backend
        assert info["backends"]["reference"][op]["available"]
        assert info["auto"][op] == "torch"
    assert info["backends"]["test-broken"]["gelu"] == {
        "available": False, "auto": False,
        "reasons": ["test-broken: needs hardware that does not exist"]}
    # the op it does not declare still reports the probe's reason, not a generic one
    assert info["backends"]["test-broken"]["attention"]["reasons"] == [
        "test-broken: needs hardware that does not exist"]


def test_env_reason_follows_the_call(capsys):
    # float64 is outside the Triton backend's declared dtypes: the reason must say so (when
    # Triton itself is available) or give why Triton is unavailable; never an empty list.
    assert main(["env", "--json", "--device", "cpu", "--dtype", "float64", "--head-dim", "26"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["call"] == {"device": "cpu", "dtype": "float64", "head_dim": 26}
    reasons = info["backends"]["triton"]["attention"]["reasons"]
    assert reasons
    if not any("import" in r or "triton is not importable" in r or "no CUDA GPU" in r for r in reasons):
        assert any("dtype torch.float64" in r for r in reasons), reasons
        assert any("head_dim 26" in r for r in reasons), reasons


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "rich-if-installed"])
def test_env_tables_name_every_backend_and_reason(capsys, broken_backend, plain):
    assert main(["env", "--device", "cpu"] + (["--plain"] if plain else [])) == 0
    out = capsys.readouterr().out
    for name in all_backends():
        assert name in out
    assert "test-broken: needs hardware that does not exist" in out
    assert fastbert.__version__ in out


def test_env_bad_dtype_is_a_clear_error(capsys):
    assert main(["env", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "'int8'" in err and "float32" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastbert {fastbert.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("env", "demo", "bench"):
        assert command in out


def test_bench_forwards_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("fastbert.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastbert.bench", fake)
    assert main(["bench", "--quick", "--op", "attention", "--help"]) == 0
    assert seen == [["--quick", "--op", "attention", "--help"]]


def test_bench_missing_runner_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastbert.bench", None)  # import raises ModuleNotFoundError
    assert main(["bench"]) == 2
    assert "fastbert.bench" in capsys.readouterr().err


def test_python_dash_m_version():
    proc = subprocess.run([sys.executable, "-m", "fastbert", "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastbert {fastbert.__version__}"
