"""fastbert's benchmark suite: ``fastbert bench`` (``main(argv)``) and the case definitions that the
pytest-benchmark files in ``benchmarks/`` reuse.

One module per op (``attention``, ``layer_norm``, ``gelu``, ``encoder``) builds :class:`Case` s
from :class:`Options`; ``formulas`` states the FLOP / byte / token count of each; ``timing``
measures (median and IQR of per-call samples; CUDA events with an L2 flush on a GPU, wall clock
on the CPU); ``runner`` checks each implementation against the reference once, times it and writes
the table, JSON and plots.
"""

from fastbert.bench.core import Case, Impl, Options, Prepared
from fastbert.bench.runner import main

__all__ = ["main", "Case", "Impl", "Options", "Prepared"]
