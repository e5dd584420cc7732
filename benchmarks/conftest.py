"""pytest-benchmark suite: ``pytest benchmarks/`` collects the ``bench_*.py`` files.

The cases are ``fastbert bench``'s (``fastbert.bench``), chosen by ``FASTBERT_BENCH_ARGS``
(default ``--quick``). The Triton interpreter is never timed: unlike ``tests/``, nothing here
sets ``TRITON_INTERPRET``, and a backend that would run interpreted is skipped with a note.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
