"""pytest-benchmark: attention forward and backward (varlen, valid-pair FLOPs) vs eager, SDPA, torch.compile, flash-attn, xformers.

Cases and implementations come from ``fastbert.bench.attention`` (the same as ``fastbert bench --op attention``);
each implementation is checked against the reference once before timing.
Run: ``pytest benchmarks/bench_attention.py`` (``FASTBERT_BENCH_ARGS`` chooses sizes; default ``--quick``).
"""

import pytest

from fastbert.bench.pytest_support import params, run_benchmark


@pytest.mark.parametrize("case, impl", params("attention"))
def test_attention(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
