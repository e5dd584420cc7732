"""Ahead-of-time compile gate of the Triton attention kernels for sm_80 and sm_90 (no GPU needed).

Compiles the highest-pressure variant (padded layout, mask + bias + dbias + dropout + local
window) of the forward, dK/dV and dQ kernels with the launchers' own arguments and the config table, and gates
on ptxas spills: zero for fp16/bf16 up to head_dim 128, a recorded budget elsewhere
(``AOT_SPILL_BUDGETS`` in the kernel module). Runs in a subprocess: this process interprets
Triton, and interpreted and compiled Triton never mix in one process. The Triton 3.6 leg runs
the same entry point in the side environment ``.venv-triton36`` when it exists.

CI compiles ``AOT_CI``: head_dim 128 (the widest bucket under the zero-spill gate, the tightest
tiles) in fp16 and bf16 (bf16 is the only place the compiled bf16 ``tl.dot`` is checked without
a GPU), 12 compiles per Triton version; the two archs compile concurrently. The other buckets
(16 to 256), fp32 (IEEE fp32 ``tl.dot`` lowers to FMAs: slow to compile, spills are a recorded
budget), the non-power-of-two head_dims, varlen, TF32 and the preprocess kernel are compiled by
the full matrix only (``-m slow``: about 500 compiles, too slow for CI's time budget).
"""

import json
import subprocess
import sys

import pytest
from _aot import ROOT, SIDE_PYTHON, aot_env, check_aot_table

pytest.importorskip("triton")

MODULE = "fastbert.backends.triton.attention"
KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
PYTHONS = [pytest.param(sys.executable, id="triton-ci"),
           pytest.param(SIDE_PYTHON, id="triton-3.6", marks=pytest.mark.skipif(
               not SIDE_PYTHON.exists(), reason=f"no Triton 3.6 side environment at {SIDE_PYTHON}"))]


def _run_aot(python, tmp_path, *args) -> dict:
    """The AOT entry point for the attention module, one subprocess per arch, run concurrently
    (each compile is single-threaded); returns the merged resource table."""
    env = aot_env()
    procs = []
    for arch in (80, 90):
        out = tmp_path / f"aot{arch}.json"
        env_arch = dict(env, TRITON_CACHE_DIR=str(tmp_path / f"triton-cache-{arch}"))
        procs.append((out, subprocess.Popen(
            [str(python), "-m", "fastbert.backends.triton._aot", "--module", MODULE, "--arch", str(arch),
             "--json", str(out), *args], cwd=ROOT, env=env_arch, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    merged = {"kernels": [], "failures": []}
    for out, proc in procs:
        stdout, stderr = proc.communicate(timeout=3600)
        table = json.loads(out.read_text()) if out.exists() else {"kernels": [], "failures": []}
        merged["triton"] = table.get("triton")
        merged["kernels"] += table["kernels"]
        merged["failures"] += table["failures"]
        assert proc.returncode == 0, f"AOT compile failed:\n{stdout}\n{stderr[-4000:]}"
    return merged


def _head_dim(label: str) -> int:
    return int(label.split("d=")[1].split()[0])


def _check(table) -> None:
    check_aot_table(table, KERNELS)
    for k in table["kernels"]:
        if "float16" in k["label"] and _head_dim(k["label"]) <= 128:  # fp16 and bf16
            assert k["spill_budget"] == 0, f"{k['label']}: fp16/bf16 up to head_dim 128 must not spill"


@pytest.mark.parametrize("python", PYTHONS)
def test_aot_attention_gate(python, tmp_path):
    """The CI set (``AOT_CI``): fwd, dK/dV and dQ, every feature on (the window too), head_dim 128
    in fp16 and bf16, sm_80 and sm_90."""
    table = _run_aot(python, tmp_path)
    _check(table)
    assert len(table["kernels"]) == 3 * 2 * 2, "3 kernels x 2 dtypes x head_dim 128 x 2 archs"
    assert {k["label"].split()[1] for k in table["kernels"]} == {"float16", "bfloat16"}
    assert all(k["label"].endswith(" window") for k in table["kernels"]), "the window joins the variant"


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
def test_aot_attention_full_matrix(python, tmp_path):
    """Every head_dim bucket (and non-power-of-two head_dims), dtype, layout, TF32, every kernel."""
    table = _run_aot(python, tmp_path, "--full")
    _check(table)
