"""Glue for the pytest-benchmark files in ``benchmarks/``: the same cases as ``fastbert bench``.

``FASTBERT_BENCH_ARGS`` holds ``fastbert bench`` arguments that choose the cases (default
``--quick``), e.g. ``FASTBERT_BENCH_ARGS="--model base,large --dtype bf16"``.
"""

from __future__ import annotations

import os
import shlex

from fastbert.bench.core import Case, Impl, synchronize


def options():
    """The benchmark options for the pytest-benchmark files, from ``FASTBERT_BENCH_ARGS``."""
    from fastbert.bench.runner import build_parser, options_from

    return options_from(build_parser().parse_args(shlex.split(os.environ.get("FASTBERT_BENCH_ARGS", "--quick"))))


def params(op: str):
    """``pytest.param(case, impl)`` for every implementation of every case of ``op``."""
    import pytest

    from fastbert.bench.runner import OPS

    out = []
    for case in OPS[op].cases(options()):
        for impl in case.impls:
            marks = [pytest.mark.skip(reason=impl.skip)] if impl.skip else []
            out.append(pytest.param(case, impl, marks=marks,
                                    id=f"{case.direction}-{case.label.replace(' ', '-')}-{impl.name}"))
    return out


def run_benchmark(benchmark, case: Case, impl: Impl) -> None:
    """Check ``impl`` against the reference once, then time it with pytest-benchmark."""
    from fastbert.bench.runner import timing_plan

    plan = timing_plan(options())
    if not hasattr(case, "_ref"):
        case._ref = case.reference()
    prepared = impl.prepare()
    check = case.check(prepared.result(), case._ref)
    assert check["ok"], f"{impl.name} differs from the reference: {check}"

    def run():
        prepared.run()
        synchronize(case.device)  # wall-clock timing: wait for the GPU

    benchmark.pedantic(run, rounds=max(plan.min_reps, 5), warmup_rounds=plan.warmup, iterations=1)
    benchmark.extra_info.update(op=case.op, direction=case.direction, case=case.label, impl=impl.name,
                                work=case.work.amount, work_unit=case.work.unit, formula=case.work.formula,
                                check=check, **prepared.info)
    if benchmark.stats is not None:  # None under --benchmark-disable
        rate, unit = case.work.rate(benchmark.stats.stats.median)
        benchmark.extra_info.update(rate=rate, rate_unit=unit)
