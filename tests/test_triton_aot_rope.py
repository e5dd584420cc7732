"""Ahead-of-time compile gate of the ModernBERT kernels (``rotary``, ``geglu``) for sm_80 and sm_90,
fp16 and bf16, with Triton 3.9 and, in the side environment ``.venv-triton36``, Triton 3.6: zero
spills (the default matrix is the highest-pressure variants; ``--full`` is the rest). Same harness
as ``tests/test_triton_aot.py``: the compile runs in a subprocess without ``TRITON_INTERPRET``."""

import sys

import pytest

pytest.importorskip("triton")

from test_triton_aot import SIDE_PYTHON, _run_aot  # noqa: E402

MODULES = ("fastbert.backends.triton.rotary", "fastbert.backends.triton.geglu")
KERNELS = ("_rotary_kernel", "_geglu_fwd_kernel", "_geglu_bwd_kernel")


def _check(table, version_prefix):
    assert table["triton"].startswith(version_prefix)
    assert not table["failures"], table["failures"]
    compiled = {(k["kernel"], k["arch"]) for k in table["kernels"]}
    assert {(n, a) for n in KERNELS for a in (80, 90)} <= compiled
    labels = {k["label"] for k in table["kernels"]}
    for want in ("rotary_fwd float16", "rotary_bwd bfloat16", "interleaved", "geglu_bwd bfloat16"):
        assert any(want in lab for lab in labels), want
    for k in table["kernels"]:
        assert k["spill_stores"] is not None and k["spill_stores"] + k["spill_loads"] == 0, k


def test_aot_rope_kernels(tmp_path):
    _check(_run_aot(sys.executable, tmp_path, "--module", *MODULES)[0], "")


@pytest.mark.skipif(not SIDE_PYTHON.exists(), reason=f"no Triton 3.6 side environment at {SIDE_PYTHON}")
def test_aot_rope_kernels_triton36(tmp_path):
    _check(_run_aot(SIDE_PYTHON, tmp_path, "--module", *MODULES)[0], "3.6")
