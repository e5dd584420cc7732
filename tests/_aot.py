"""What the ahead-of-time compile gates (test_triton_aot*.py) share: the side environment's
Python, the subprocess environment (compiled Triton: this process interprets it, and the two never
mix in one process) and the check of a compile table (``fastbert.backends.triton._aot --json``)."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDE_PYTHON = ROOT / ".venv-triton36" / "bin" / "python"  # the Triton 3.6 leg (CI creates it)


def aot_env() -> dict:
    """This environment without ``TRITON_INTERPRET``, with this checkout first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def check_aot_table(table: dict, kernels) -> None:
    """No compile failed, each of ``kernels`` compiled for sm_80 and sm_90, and every compile has
    ptxas spill statistics within its recorded budget."""
    assert not table["failures"], table["failures"]
    compiled = {(k["kernel"], k["arch"]) for k in table["kernels"]}
    for kernel in kernels:
        for arch in (80, 90):
            assert (kernel, arch) in compiled, f"{kernel} not compiled for sm_{arch}"
    for k in table["kernels"]:
        assert k["spill_stores"] is not None, f"no ptxas spill statistics for {k['label']}"
        assert k["spill_stores"] + k["spill_loads"] <= k["spill_budget"], k
