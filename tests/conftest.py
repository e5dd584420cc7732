"""Test setup: Triton runs interpreted on CPU-only machines; the variable must be set before any
kernel module is imported and applies to the whole process (interpreted and compiled Triton never
mix in one process). GPU tests skip on CPU; a CUDA test that skips because an extension that should
be there is missing fails instead (``_build_rules``).

Collection never depends on optional packages or the checkpoint package (the GPU machine has
neither): optional inputs come from fixtures or helpers that skip when a test runs (``_minilm``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _build_rules import make_hook  # noqa: E402

pytest_runtest_makereport = make_hook(gpu_present=torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run by benchmarks/device_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Poison every output/workspace with NaN before a backend writes it."""
    from fastbert.ops import poisoned_outputs

    with poisoned_outputs(True):
        yield
