"""When a skipped test is a failure: the build-failure-is-a-failure rule (conftest.py applies it).

A CUDA test skips when its extension cannot be used, which is right on a CPU machine that has no
toolkit, and wrong when the extension should be there: a device check whose ``_C`` build failed
would otherwise look green. So a skip whose reason names ``fastbert._C`` / ``fastbert._C_host`` /
``fastbert._C_harness`` becomes a failure, carrying the build manifest's account (``fastbert/_build_info.py``), when

- a GPU is present and the test is marked ``gpu`` (whatever the reason: not built, build failed,
  built for another version, no usable device); or
- the build manifest says the module was built (or failed to build) here, yet it does not load.

A manifest that says a module was skipped (``FASTBERT_BUILD_HOST=0``, no nvcc) keeps the skip.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest


def _load_build_info():
    """``fastbert._build_info`` of the fastbert that ``import fastbert`` would find, loaded without
    importing the package (so conftest.py does not import torch-heavy fastbert before it sets the
    environment, and this module stays cheap)."""
    if "fastbert._build_info" in sys.modules:
        return sys.modules["fastbert._build_info"]
    spec = importlib.util.find_spec("fastbert")
    path = Path(next(iter(spec.submodule_search_locations))) / "_build_info.py"
    mod_spec = importlib.util.spec_from_file_location("_fastbert_build_info", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


_build_info = _load_build_info()
_NAMES = {"_C": re.compile(r"fastbert\._C(?!_host)\b"), "_C_host": re.compile(r"fastbert\._C_host\b"),
          "_C_harness": re.compile(r"fastbert\._C_harness\b")}


def _loads(name: str) -> bool:
    from fastbert.backends.cuda import load_extension

    return not isinstance(load_extension(name), str)


def skip_is_failure(reason: str, *, gpu_marked: bool, gpu_present: bool, manifest: dict | None = None,
                    loads=_loads) -> str | None:
    """The failure message for a test that skipped with ``reason``, or None when the skip stands.

    ``manifest``: the build manifest (read from the package when None); ``loads(name)``: whether
    extension ``name`` loads (injectable for tests of this rule).
    """
    manifest = _build_info.read_manifest() if manifest is None else manifest
    for name, pattern in _NAMES.items():
        if not pattern.search(reason):
            continue
        status, why = _build_info.module_status(name, manifest)
        account = f"build manifest: fastbert.{name} {status}" + (f": {why}" if why else "")
        if name == "_C" and gpu_present and gpu_marked:
            return (f"a GPU is present, so this CUDA test may not skip: {reason}\n{account}\n"
                    f"{_build_info.render(manifest)}")
        if status in ("built", "failed") and not loads(name):
            return (f"the build manifest says fastbert.{name} was {status} here, yet the test skipped: "
                    f"{reason}\n{account}")
    return None


def _skip_reason(report) -> str | None:
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    return str(report.longrepr[2])


def make_hook(gpu_present: bool):
    """A ``pytest_runtest_makereport`` hook wrapper applying :func:`skip_is_failure`."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        reason = _skip_reason(report)
        if reason is None or report.when not in ("setup", "call"):
            return
        failure = skip_is_failure(reason, gpu_marked=item.get_closest_marker("gpu") is not None,
                                  gpu_present=gpu_present)
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure

    return pytest_runtest_makereport
