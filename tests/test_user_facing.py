"""What a user meets first: errors that name the argument, what was expected and what came
(found by a break-it pass over the public API), ``fastbert env``'s extension rows, plot titles."""

from __future__ import annotations

import pytest
import torch

import fastbert.ops as ops


@pytest.mark.parametrize("call", [
    lambda t: ops.gelu(t), lambda t: ops.geglu(t), lambda t: ops.layer_norm(t, torch.ones(1), torch.zeros(1))],
    ids=["gelu", "geglu", "layer_norm"])
def test_zero_dim_input_reads_a_range_of_ndims(call):
    with pytest.raises(ValueError, match=r"^x: expected 1 to 8 dims, got 0 \(shape \(\)\)$"):
        call(torch.tensor(1.0))


def test_two_ndims_and_one_ndim_keep_their_wording():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^q: expected 3 or 4 dims, got 2"):
        ops.rotary(x, x, torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^bias: expected 1 dims, got 2"):
        ops.gelu(x, bias=x)


def test_bad_fastbert_backend_names_the_variable_and_the_valid_names(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "foo")
    with pytest.raises(ValueError, match=r"^FASTBERT_BACKEND \(environment variable\): expected one of "
                                         r"\[.*'reference'.*'torch'.*\] or 'auto', got 'foo'$"):
        ops.gelu(torch.randn(4, 8))
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    ops.gelu(torch.randn(4, 8))  # 'auto' is one of the valid names


@pytest.mark.parametrize("bad", ["foo", 3, ["torch"]])
def test_bad_backend_argument_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^backend: expected one of \[.*'torch'.*\] or 'auto', got " +
                       repr(bad).replace("[", r"\[").replace("]", r"\]") + "$"):
        ops.gelu(torch.randn(4, 8), backend=bad)


@pytest.mark.parametrize("window", [[2, 3], (2, 3), torch.Size([2, 3]), range(2, 4)],
                         ids=["list", "tuple", "Size", "range"])
def test_window_takes_any_length_two_sequence(window):
    """Lists come from JSON configs; PyTorch's pair arguments take any sequence too."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, window=window), ops.attention(q, k, v, window=(2, 3)))
    assert not torch.allclose(ops.attention(q, k, v, window=window), ops.attention(q, k, v))


@pytest.mark.parametrize("bad", [b"ab", "ab", torch.tensor([1, 2]), {1: 2, 3: 4}, [1, 2, 3]])
def test_window_that_is_no_pair_says_the_type(bad):
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match=r"^window: expected None or a \(left, right\) pair of two ints >= 0 \(a tuple, "
                       rf"list or other length-2 sequence\), got .* of type {type(bad).__name__}$"):
        ops.attention(q, q, q, window=bad)


def test_three_dim_q_without_cu_seqlens_hints_at_varlen():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=r"^q: expected 4 dims, got 3 \(shape \(10, 2, 8\)\); a 3-D q \(total_tokens, "
                       r"num_heads, head_dim\) is the varlen \(unpadded\) layout: pass cu_seqlens .* and max_seqlen"):
        ops.attention(q, q, q)
    q4 = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match=r"^q: expected 3 dims, got 4 .*; with cu_seqlens q is the varlen layout"):
        ops.attention(q4, q4, q4, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^q: expected 4 dims, got 2 .*; q is \(batch, seqlen_q, num_heads, "):
        ops.attention(q[0], q[0], q[0])


def test_env_lists_the_cpu_extension_built_or_why_not(monkeypatch):
    """``fastbert env`` reports fastbert._C_cpu next to _C and _C_host: its version when it loads,
    the build manifest's reason when it was not built."""
    import sys

    import fastbert
    from fastbert import _build_info, env
    from fastbert.backends import _philox

    info = env.collect_env("cpu")
    assert set(env.EXTENSIONS) == {"_C", "_C_host", "_C_cpu"}
    for name in env.EXTENSIONS:
        assert f"fastbert.{name}" in info["versions"]
    manifest = {"present": True, "schema": _build_info.SCHEMA, "modules": {
        "_C_cpu": {"status": "skipped", "reason": "FASTBERT_BUILD_CPU=0: not building fastbert._C_cpu"}}}
    monkeypatch.setattr(_build_info, "read_manifest", lambda path=None: manifest)
    monkeypatch.setattr(_philox, "_CPU_EXT", None)  # env reports what the loader makes of it: load again
    monkeypatch.setitem(sys.modules, "fastbert._C_cpu", None)  # as if not built
    versions = env.collect_env("cpu")["versions"]
    assert versions["fastbert._C_cpu"] is None
    assert versions["fastbert._C_cpu (why not)"] == (
        "not built (skipped): FASTBERT_BUILD_CPU=0: not building fastbert._C_cpu")

    class Old:  # built for another fastbert
        @staticmethod
        def version():
            return "0.0.1"

    monkeypatch.setattr(_philox, "_CPU_EXT", None)
    monkeypatch.setitem(sys.modules, "fastbert._C_cpu", Old)
    versions = env.collect_env("cpu")["versions"]
    assert versions["fastbert._C_cpu"] == "0.0.1"
    assert versions["fastbert._C_cpu (why not)"] == (
        f"fastbert._C_cpu was built for fastbert 0.0.1, this is {fastbert.__version__}: rebuild")


def test_gelu_and_layer_norm_plot_titles_say_the_hidden_size(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from fastbert.bench import report

    titles = []
    real = Axes.set_title
    def spy(ax, text, *args, **kwargs):
        titles.append(text)
        return real(ax, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", spy)

    def case(op, direction, model, hidden, rows):
        result = {"impl": "fastbert-torch", "status": "ok", "rate": 2.0, "median_s": 1.0, "q25_s": 0.9,
                  "q75_s": 1.1, "rate_unit": "GB/s"}
        params = {"model": model, "rows": rows} if hidden is None else {"model": model, "rows": rows, "hidden": hidden}
        return {"op": op, "direction": direction, "params": params, "x": rows, "x_name": "rows (tokens)",
                "results": [result]}

    cases = [case("gelu", "fwd", "bert-base", 3072, r) for r in (64, 128)]
    for model, hidden in (("bert-base", 768), ("bert-large", 1024)):
        cases += [case("layer_norm", "bwd", model, hidden, r) for r in (64, 128)]
    cases += [case("attention", "fwd", "bert-base", None, r) for r in (64, 128)]
    paths, why = report.write_plots(str(tmp_path), cases, "t", combined=False)
    assert len(paths) == 3, why
    assert sorted(titles) == ["attention fwd", "gelu fwd, hidden 3072", "layer_norm bwd, hidden 768 / 1024"]


@pytest.mark.parametrize("env, reasons", [
    ({"FASTBERT_BUILD_HOST": "0", "FASTBERT_BUILD_CPU": "0"},
     {"_C_host": "FASTBERT_BUILD_HOST=0: not building fastbert._C_host",
      "_C_cpu": "FASTBERT_BUILD_CPU=0: not building fastbert._C_cpu"}),
    ({"PATH": "/nonexistent", "CXX": ""},  # no C++ compiler on PATH
     {"_C_host": "no C++ compiler: not building fastbert._C_host (the 'cuda-host' test backend)",
      "_C_cpu": "no C++ compiler: not building fastbert._C_cpu (the torch backend uses torch ops instead)"})],
    ids=["switched-off", "no-compiler"])
def test_setup_says_why_each_cpp_module_is_skipped(tmp_path, env, reasons):
    """setup.py plans _C_host and _C_cpu by one rule (switch, then compiler); the manifest says why not."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    run_env.update(FASTBERT_BUILD_CUDA="0", PYTHONPATH=str(root), **env)
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                         env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    modules = json.loads((tmp_path / "fastbert" / "_build_manifest.json").read_text())["modules"]
    for name, why in reasons.items():
        assert modules[name] == {"status": "skipped", "reason": why}, modules


@pytest.mark.parametrize("op", ["gelu", "geglu", "layer_norm"])
def test_meta_tensor_names_the_device(op):
    """A meta tensor (no values) reads the dispatch error naming the device, not autocast's
    'unknown device type'."""
    with pytest.raises(RuntimeError, match=rf"^fastbert.ops.{op}: no backend can run this call:\n  - torch: device 'meta'"):
        getattr(ops, op)(torch.randn(4, 8, device="meta"))


@pytest.mark.parametrize("bad, exc, match", [
    ("8", TypeError, r"expected an int or a 1-element shape .* got '8' of type str"),
    (8.0, TypeError, r"got 8.0 of type float"), (True, TypeError, r"got True of type bool"),
    ((8.0,), TypeError, r"got \(8.0,\) of type tuple"), (-1, ValueError, r"expected a size >= 0, got -1"),
    ((2, 3), ValueError, r"normalises the last dim only")])
def test_nn_layer_norm_bad_shape_names_the_argument(bad, exc, match):
    import fastbert.nn as fnn

    with pytest.raises(exc, match=r"^normalized_shape: .*" + match):
        fnn.LayerNorm(bad)


def test_nn_layer_norm_takes_what_torch_takes():
    import numpy as np

    import fastbert.nn as fnn

    for shape in (8, (8,), [8], torch.Size([8]), np.int64(8)):
        m = fnn.LayerNorm(shape)
        assert m.normalized_shape == torch.nn.LayerNorm(shape).normalized_shape == (8,)
        assert all(type(n) is int for n in m.normalized_shape)


def test_nn_gelu_checks_approximate_when_built():
    import fastbert.nn as fnn

    with pytest.raises(ValueError, match=r"^approximate: expected one of \('none', 'tanh'\), got 'bogus'$"):
        fnn.GELU("bogus")
    assert fnn.GELU("tanh").approximate == "tanh"


def test_model_inputs_of_the_wrong_shape_name_the_argument():
    transformers = pytest.importorskip("transformers")
    import fastbert.models as models

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                     intermediate_size=40, max_position_embeddings=16)
    model = models.BertModel(config).eval()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^token_type_ids: expected shape \(batch or 1, seqlen\) = \(2 or 1, 7\), "
                                         r"got \(2, 6\)$"):
        model(input_ids=ids, token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^position_ids: expected shape .* got \(3, 7\)$"):
        model(input_ids=ids, position_ids=torch.arange(7).expand(3, 7))
    with pytest.raises(ValueError, match=r"^inputs_embeds: expected \(batch, seqlen, 32\), got shape \(2, 7, 31\)$"):
        model(inputs_embeds=torch.randn(2, 7, 31))
    with torch.no_grad():  # the shapes transformers takes still run: (1, seqlen) and (seqlen,) positions
        a = model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids, position_ids=torch.arange(7)[None]).last_hidden_state, a)
        torch.testing.assert_close(model(input_ids=ids, position_ids=torch.arange(7)).last_hidden_state, a)
