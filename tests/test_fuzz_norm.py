"""Differential fuzz of LayerNorm and GELU: every CPU backend (torch; triton under the interpreter;
cuda-host) x forward and backward against the reference in fp64, by tests/_tolerance.py's rule.

Cases (tests/_fuzz_norm.py) are drawn from fixed seeds over shapes (0-size, 1, primes, hidden
384 / 1023 / 1536, leading dims), dtypes (fp32 / fp16 / bf16 / fp64, parameters in x's dtype or
fp32 independently), residual / x_bias / dropout (same seed, same mask on every backend), eps,
large-mean and constant rows, GELU tails (large negative, +-inf) and approximate none / tanh, with
strided, expanded (stride 0) and misaligned views of every tensor argument. A case a backend does
not support (fp64 on triton / cuda-host) is skipped with the dispatcher's reason.

Default run: 30 LayerNorm + 20 GELU inputs on each of the 3 backends (150 cases, 132 run: fp64
inputs skip triton and cuda-host). ``-m slow``: 300 + 200 other inputs, up to 4x larger (1500
cases, 1426 run). The cuda-host cases run in one subprocess per run: a crash of
the C++ code fails the case it died in, printing its input, instead of ending the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _fuzz_norm import BACKENDS, available, case_id, cases, check_case

HERE = Path(__file__).resolve().parent
DEFAULT = cases("layer_norm", 30, seed=1) + cases("gelu", 20, seed=2)
LONG = cases("layer_norm", 300, seed=11, max_elems=16384) + cases("gelu", 200, seed=12, max_elems=16384)


def _params(case_list):
    return [pytest.param(c, b, id=f"{b}-{case_id(c)}") for c in case_list for b in BACKENDS]


def _cuda_host_results(case_list, env=None) -> dict:
    """Run every cuda-host case of ``case_list`` in one child process; {case index: (ok, message)}.
    A case the child started but never finished (it crashed) fails with the child's exit status."""
    todo = [(i, c) for i, c in enumerate(case_list) if available(c, "cuda-host") is None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE)] + sys.path), **(env or {}))
    proc = subprocess.run([sys.executable, str(HERE / "_fuzz_norm.py")], env=env, capture_output=True, text=True,
                          input=json.dumps([[c, "cuda-host"] for _, c in todo]), timeout=1800)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        idx, _, msg = rest.partition(" ")
        if word == "START":
            started = todo[int(idx)][0]
        elif word in ("PASS", "FAIL"):
            results[todo[int(idx)][0]] = (word == "PASS", json.loads(msg) if msg else "")
            started = None
    if started is not None:
        results[started] = (False, f"the child process died here (exit status {proc.returncode}):\n"
                                   f"{proc.stderr[-2000:]}")
    for i, _ in todo:
        results.setdefault(i, (False, f"not reached: the child process ended with status {proc.returncode}"))
    return results


_memo: dict = {}


def _check(case, backend, case_list, key):
    reason = available(case, backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend != "cuda-host":
        try:
            check_case(case, backend)
        except AssertionError as exc:
            raise AssertionError(f"{backend} failed on input {json.dumps(case)}:\n{exc}") from None
        return
    if key not in _memo:
        _memo[key] = _cuda_host_results(case_list)
    ok, msg = _memo[key][next(i for i, c in enumerate(case_list) if c is case)]
    assert ok, f"cuda-host failed on input {json.dumps(case)}:\n{msg}"


# The interpreter warns on GELU's far tails (exp overflow to inf, inf * 0): the values are checked.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case,backend", _params(DEFAULT))
def test_fuzz(case, backend):
    _check(case, backend, DEFAULT, "default")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case,backend", _params(LONG))
def test_fuzz_long(case, backend):
    _check(case, backend, LONG, "long")


def test_a_crash_fails_the_case_it_died_in():
    """The harness can fail: a child that aborts (as a segfaulting kernel would) on its second
    case passes the first, fails the second naming the exit status, and never reaches the third."""
    some = [c for c in DEFAULT if available(c, "cuda-host") is None and c["op"] == "gelu"][:3]
    if len(some) < 3 or available(some[0], "cuda-host") is not None:
        pytest.skip("cuda-host is unavailable")
    got = _cuda_host_results(some, env={"FUZZ_NORM_CRASH_AT": "1"})
    assert got[0] == (True, "")
    assert not got[1][0] and "died here (exit status -6)" in got[1][1]
    assert not got[2][0] and "not reached" in got[2][1]
