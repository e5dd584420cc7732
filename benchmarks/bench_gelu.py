"""pytest-benchmark: bias-GELU forward and backward (GB/s) vs the eager composite and torch.compile.

Cases and implementations come from ``fastbert.bench.gelu`` (the same as ``fastbert bench --op gelu``);
each implementation is checked against the reference once before timing.
Run: ``pytest benchmarks/bench_gelu.py`` (``FASTBERT_BENCH_ARGS`` chooses sizes; default ``--quick``).
"""

import pytest

from fastbert.bench.pytest_support import params, run_benchmark


@pytest.mark.parametrize("case, impl", params("gelu"))
def test_gelu(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
