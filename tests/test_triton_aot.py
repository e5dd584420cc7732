"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90, gated on ptxas spills.

The compile runs in a subprocess: this process interprets Triton (TRITON_INTERPRET=1 from
conftest), and interpreted and compiled Triton never mix in one process. The Triton 3.6 leg runs
the same entry point in the side environment ``.venv-triton36`` when it exists (CI creates it).
"""

import json
import subprocess
import sys

import pytest
from _aot import ROOT, SIDE_PYTHON, aot_env, check_aot_table

pytest.importorskip("triton")

from fastbert.backends.triton._aot import parse_ptxas_spills, parse_resource_usage  # noqa: E402

EXPECTED_KERNELS = ("_philox_words_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_gelu_fwd_kernel",
                    "_gelu_bwd_kernel")
# This area's kernel modules (the attention kernels are gated by their own tests).
MODULES = ("fastbert.backends.triton._philox", "fastbert.backends.triton.layer_norm",
           "fastbert.backends.triton.gelu")


def _run_aot(python, tmp_path, *args):
    env = aot_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "aot.json"
    proc = subprocess.run([str(python), "-m", "fastbert.backends.triton._aot", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _layer_norm_fwd_kernel:
  REG:40 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:412 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:255 STACK:56 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = parse_resource_usage(text)
    assert usage["_layer_norm_fwd_kernel"]["REG"] == 40
    assert usage["_layer_norm_fwd_kernel"]["STACK"] == 8
    assert usage["_layer_norm_fwd_kernel"]["LOCAL"] == 4
    assert usage["other"]["REG"] == 255 and usage["other"]["STACK"] == 56


def test_parse_ptxas_spills():
    log = """ptxas info    : Compiling entry function 'a' for 'sm_90a'
ptxas info    : Function properties for a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'b' for 'sm_90a'
ptxas info    : Function properties for b
    56 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
"""
    assert parse_ptxas_spills(log, "a") == (0, 0)
    assert parse_ptxas_spills(log, "b") == (24, 32)
    assert parse_ptxas_spills("no log", "a") is None


def _check_table(table, version_prefix):
    assert table["triton"].startswith(version_prefix)
    check_aot_table(table, EXPECTED_KERNELS)


def test_aot_compile_kernels(tmp_path):
    table, _ = _run_aot(sys.executable, tmp_path, "--module", *MODULES)
    _check_table(table, "")


@pytest.mark.skipif(not SIDE_PYTHON.exists(), reason=f"no Triton 3.6 side environment at {SIDE_PYTHON}")
def test_aot_compile_kernels_triton36(tmp_path):
    table, _ = _run_aot(SIDE_PYTHON, tmp_path, "--module", *MODULES)
    _check_table(table, "3.6")
