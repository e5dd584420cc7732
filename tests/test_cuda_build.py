"""The CUDA build as installed: modules, versions, build info, the ptxas gate, the binding boundary.

CI installs the package as the README says (nvcc on PATH, ``FASTBERT_WERROR=1``), which compiles
``fastbert._C`` for sm_80 and sm_90a with warnings as errors; these tests check what that produced.
Where nvcc is absent at test time the ``_C`` checks skip with the reason, unless the build manifest
says ``_C`` was built (or failed) here: then the skip is a failure (``_build_rules``). The manifest
itself is tested in ``test_gpu_readiness.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert.backends import CallInfo, get_backend
from fastbert.backends import cuda as cuda_backend
from fastbert.backends.cuda import load_extension
from fastbert.ops._dispatch import resolve

NVCC = shutil.which("nvcc") if os.environ.get("FASTBERT_BUILD_CUDA", "1") != "0" else None
# The archs the build was asked for (CI: the default; the device check builds 90a only).
ARCHS = [a for a in os.environ.get("FASTBERT_CUDA_ARCHS", "80;90a").split(";") if a]


def _c():
    ext = load_extension("_C")
    if isinstance(ext, str):
        if NVCC:
            pytest.fail(f"nvcc is on PATH but fastbert._C is unusable: {ext}")
        pytest.skip(ext)
    return ext


def _exts():
    out = []
    for name in ("_C_host", "_C"):
        ext = load_extension(name)
        if not isinstance(ext, str):
            out.append(ext)
    if not out:
        pytest.skip("neither fastbert._C nor fastbert._C_host is built")
    return out


def test_cuda_module_is_built_for_the_requested_archs():
    """Default 80;90a: SASS for sm_80 and sm_90a plus compute_80 PTX for newer GPUs."""
    info = _c().build_info()
    assert info["version"] == fastbert.__version__
    assert not info["host"]
    plain = [a for a in ARCHS if not a.endswith(("-real", "-virtual"))]
    assert {f"{a}-real" for a in plain} <= set(info["archs"]), info["archs"]
    if any(not a.endswith("a") for a in plain):
        assert any(a.endswith("-virtual") for a in info["archs"]), "no PTX for forward compatibility"


def test_ptxas_report_has_every_kernel_for_every_arch_and_no_spills():
    _c()
    rows = cuda_backend.ptxas_report()
    assert rows, f"no ptxas report at {cuda_backend.PTXAS_REPORT}"
    kernels = {r["kernel"] for r in rows}
    sass = {"sm_" + a.split("-")[0] for a in ARCHS if not a.endswith("-virtual")}
    for k in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == k} >= sass, k
    assert any("layer_norm_fwd_kernel<__half>" in k for k in kernels)
    assert any("gelu_bwd_kernel<__nv_bfloat16>" in k for k in kernels)
    # Every kernel, fp32 included, may not spill at all.
    spills = [f"{r['kernel']} [{r['arch']}]: {r['spill_store_bytes']} B stores, {r['spill_load_bytes']} B loads"
              for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_build_info_for_fastbert_env():
    info = cuda_backend.build_info()
    assert set(info) >= {"_C", "_C_host", "verified_on_gpu", "cuda_backend_unavailable_reason"}
    assert info["verified_on_gpu"] == cuda_backend.VERIFIED_ON_GPU
    for name in ("_C", "_C_host"):
        assert info[name]["available"] or info[name]["reason"]


def test_cuda_is_opt_in_and_cuda_host_is_never_auto():
    assert get_backend("cuda-host").auto == ()
    assert get_backend("cuda").auto == tuple(op for op, ok in cuda_backend.VERIFIED_ON_GPU.items() if ok)
    assert resolve(CallInfo("layer_norm", "cpu", torch.float32)) == "torch"


def test_import_cuda_module_without_a_gpu_and_calls_raise_clearly():
    ext = _c()
    count, why = ext.device_count()
    if count:
        pytest.skip("a CUDA device is present")
    assert why
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        ext.gelu_fwd(x=256, bias=0, y=256, rows=1, hidden=8, dtype=0, device=0)
    reason = get_backend("cuda").unavailable_reason("gelu")
    assert reason and ("no CUDA GPU" in reason or "no CUDA device" in reason)


def test_import_fastbert_without_the_extensions():
    code = ("import sys; sys.modules['fastbert._C'] = None; sys.modules['fastbert._C_host'] = None\n"
            "import fastbert, torch\n"
            "from fastbert.backends import get_backend\n"
            "print(get_backend('cuda').unavailable_reason('layer_norm'))\n"
            "print(get_backend('cuda-host').unavailable_reason('gelu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "fastbert._C is not built" in lines[0]
    assert "fastbert._C_host is not built" in lines[1]


def test_version_mismatch_makes_the_backend_unavailable(monkeypatch):
    from fastbert.backends.cuda import _ext

    if isinstance(load_extension("_C_host"), str):
        pytest.skip("fastbert._C_host is not built")
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(fastbert, "__version__", "0.0.0-other")
    reason = load_extension("_C_host")
    assert isinstance(reason, str) and "built for fastbert" in reason and "0.0.0-other" in reason


def _ln_kwargs(**over):
    buf = torch.zeros(64, dtype=torch.float32)
    p = buf.data_ptr()
    kw = dict(x=p, weight=0, bias=0, residual=0, x_bias=0, y=p, mean=p, rstd=p, h=0, seed=0, rows=2, hidden=8,
              dtype=0, eps=1e-5, device=-1)
    kw.update(over)
    return kw, buf


@pytest.mark.parametrize("over,message", [
    ({"x": 0}, "x: expected a non-null pointer"),
    ({"y": 0}, "y: expected a non-null pointer"),
    ({"rows": 0}, "rows: expected > 0, got 0"),
    ({"hidden": -3}, "hidden: expected > 0, got -3"),
    ({"dtype": 7}, "dtype: expected a dtype code"),
    ({"dropout_p": 0.5}, "seed: expected a pointer"),
    ({"dropout_p": 1.0, "seed": 8}, "dropout_p: expected 0 <= dropout_p < 1"),
    ({"residual": 8}, "h: expected a non-null pointer"),
    ({"eps": -1.0}, "eps: expected a finite value >= 0"),
    ({"misalign": "x"}, "x: expected a pointer aligned to 4 bytes"),
    ({"misalign": "mean"}, "mean: expected a pointer aligned to 4 bytes"),
])
def test_binding_rejects_bad_input(over, message):
    for ext in _exts():
        kw, buf = _ln_kwargs()
        kw.update({k: v for k, v in over.items() if k != "misalign"})
        name = over.get("misalign")
        if name:
            kw[name] = buf.data_ptr() + 2
        if ext.build_info()["host"] is False:
            kw["device"] = 0
        with pytest.raises(ValueError, match=message):
            ext.layer_norm_fwd(**kw)
        assert (buf == 0).all()  # nothing was written


def test_binding_checks_workspace_and_gelu_arguments():
    for ext in _exts():
        dev = -1 if ext.build_info()["host"] else 0
        buf = torch.zeros(1024, dtype=torch.float32)
        p = buf.data_ptr()
        need = ext.gelu_bwd_workspace_bytes(rows=4, hidden=8, need_dbias=True)
        assert need > 0
        with pytest.raises(ValueError, match="workspace_bytes: expected >= "):
            ext.gelu_bwd(dy=p, x=p, bias=0, dx=p, dbias=p, workspace=p, workspace_bytes=need - 4, rows=4, hidden=8,
                         dtype=0, device=dev)
        with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh'"):
            ext.gelu_fwd(x=p, bias=0, y=p, rows=4, hidden=8, dtype=0, approximate="erf", device=dev)
        with pytest.raises(ValueError, match="dx: expected a pointer aligned to 2 bytes"):
            ext.gelu_bwd(dy=p, x=p, bias=0, dx=p + 1, dbias=0, workspace=0, workspace_bytes=0, rows=4, hidden=8,
                         dtype=1, device=dev)
        # dy: required by the backward, x's dtype (checked once, in binding_util.h's activation_dy)
        for dy, message in ((0, "dy: expected a non-null pointer"), (p + 1, "dy: expected a pointer aligned to 2")):
            with pytest.raises(ValueError, match=message):
                ext.gelu_bwd(dy=dy, x=p, bias=0, dx=p, dbias=0, workspace=0, workspace_bytes=0, rows=4, hidden=8,
                             dtype=1, device=dev)
            with pytest.raises(ValueError, match=message):
                ext.geglu_bwd(dy=dy, x=p, bias=0, dx=p, dbias=0, workspace=0, workspace_bytes=0, rows=4, half=8,
                              dtype=1, device=dev)
        assert (buf == 0).all()
