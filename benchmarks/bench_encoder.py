"""pytest-benchmark: the encoder (unpadded) vs transformers.BertModel sdpa/eager: inference forward and a training step (real tokens/s).

Cases and implementations come from ``fastbert.bench.encoder`` (the same as ``fastbert bench --op encoder``);
each implementation is checked against the reference once before timing.
Run: ``pytest benchmarks/bench_encoder.py`` (``FASTBERT_BENCH_ARGS`` chooses sizes; default ``--quick``).
"""

import pytest

from fastbert.bench.pytest_support import params, run_benchmark


@pytest.mark.parametrize("case, impl", params("encoder"))
def test_encoder(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
