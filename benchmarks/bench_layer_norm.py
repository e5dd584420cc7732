"""pytest-benchmark: BERT's add & norm forward and backward (GB/s) vs the eager composite and torch.compile.

Cases and implementations come from ``fastbert.bench.layer_norm`` (the same as ``fastbert bench --op layer_norm``);
each implementation is checked against the reference once before timing.
Run: ``pytest benchmarks/bench_layer_norm.py`` (``FASTBERT_BENCH_ARGS`` chooses sizes; default ``--quick``).
"""

import pytest

from fastbert.bench.pytest_support import params, run_benchmark


@pytest.mark.parametrize("case, impl", params("layer_norm"))
def test_layer_norm(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
