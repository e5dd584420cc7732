"""Shared pieces of the differential fuzz suites: seeded case generation and a crash-isolating
subprocess runner for the C++ paths (``cuda-host``), where a bad pointer is a SIGSEGV, not an
exception.

Cases are drawn from ``random.Random(f"{seed}:{index}")`` (string seeds hash with SHA-512: the same
case in every process and Python version), so a failing case is reproduced from its id alone.

The runner executes a test module's ``check(case)`` for a list of case ids in a child process
that reports, one JSON line each, when a case starts and how it ended. If the child dies (a
signal, an abort, a C++ exception that escapes), the case it had started is recorded as a crash
with its input and the child's stderr, and a new child resumes with the cases after it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

TESTS_DIR = Path(__file__).resolve().parent


def case_rng(seed: int, index: int) -> random.Random:
    """The generator of case ``index`` of a suite seeded with ``seed`` (stable across processes)."""
    return random.Random(f"{seed}:{index}")


def draw_cases(draw: Callable[[random.Random, int], object], n: int, seed: int) -> list:
    """``[draw(rng_i, i) for i in range(n)]`` with one independent seeded generator per case."""
    return [draw(case_rng(seed, i), i) for i in range(n)]


class SubprocessRunner:
    """Runs ``<module>.check_by_id(case_id)`` for many cases in child processes, once per session.

    ``results(ids)`` returns ``{id: None (passed) | message}``; a crash's message names the case,
    the exit status and the tail of the child's stderr. The child gets the parent's environment
    (so ``TRITON_INTERPRET`` and friends match) with the tests directory on ``sys.path``.
    """

    def __init__(self, module: str, timeout_s: float = 900.0):
        self.module = module
        self.timeout_s = timeout_s
        self._results: dict[str, str | None] = {}

    def results(self, ids: list[str]) -> dict[str, str | None]:
        todo = [i for i in ids if i not in self._results]
        while todo:
            done = self._run_child(todo)
            todo = [i for i in todo if i not in self._results]
            if not done and todo:  # the child made no progress at all: give up on the rest
                for i in todo:
                    self._results[i] = "the fuzz child process made no progress (see the first failure)"
                break
        return {i: self._results[i] for i in ids}

    def _run_child(self, ids: list[str]) -> int:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        cmd = [sys.executable, "-c", f"import _fuzz; _fuzz._child_main({self.module!r})"]
        proc = subprocess.run(cmd, input="\n".join(ids), capture_output=True, text=True, env=env,
                              timeout=self.timeout_s)
        started, finished = None, 0
        for line in proc.stdout.splitlines():
            if not line.startswith("FUZZ "):
                continue
            msg = json.loads(line[5:])
            if "start" in msg:
                started = msg["start"]
            else:
                self._results[msg["id"]] = msg["error"]
                finished += 1
                started = None
        if started is not None:  # the child died inside this case
            tail = proc.stderr[-3000:]
            self._results[started] = (f"CRASH in case {started}: child exited with status {proc.returncode}"
                                      f"\n--- child stderr (tail) ---\n{tail}")
            finished += 1
        elif proc.returncode != 0 and finished == 0:
            for i in ids:
                self._results[i] = f"fuzz child failed before any case (status {proc.returncode}):\n{proc.stderr[-3000:]}"
            finished = len(ids)
        return finished


def _child_main(module: str) -> None:
    """Child side of :class:`SubprocessRunner`: read case ids from stdin, run each, report."""
    import importlib
    import traceback

    mod = importlib.import_module(module)
    for case_id in sys.stdin.read().split():
        print("FUZZ " + json.dumps({"start": case_id}), flush=True)
        try:
            mod.check_by_id(case_id)
            error = None
        except Exception:  # an assertion or an error: a failure of this case, not of the child
            error = traceback.format_exc(limit=6)
        print("FUZZ " + json.dumps({"id": case_id, "error": error}), flush=True)
