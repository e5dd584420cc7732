"""Timing: every sample kept, summarised by the median and the interquartile range.

GPU: each sample is one call bracketed by CUDA events on the current stream, with the L2 cache
flushed (a 256 MiB buffer overwritten) before it, so no call reads what the previous one left in
L2; warm-up calls (Triton compilation, autotuning, ``torch.compile``, allocator growth) run first
and are not recorded. CPU: the same protocol with ``time.perf_counter`` around each call under a
fixed ``torch.set_num_threads`` (no cache flush: a CPU run measures what a user sees), or, with
``clock="cpu"`` at one thread, the process's CPU time, which other jobs on a shared machine do
not inflate.

CPU allocator: glibc's malloc serves a large block (above a threshold that moves at run time,
from 128 KiB up to 32 MiB) with a fresh ``mmap`` and unmaps it on free, and it returns the top of
its heap to the system once more than a threshold is free there. Tensors of BERT shapes (1024 x
3072 fp32 = 12 MiB) sit on those thresholds, so some calls page-fault on fresh memory and others
reuse it, and which ones changes from run to run. :func:`steady_malloc` (called by the CPU
benchmarks' command lines at start, not by their library ``run`` functions unless asked: it cannot
be undone in a process) switches both off with ``mallopt`` (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD``
at its maximum): after warm-up every call reuses memory, the steady state a training loop sees.
It is process-wide, so every implementation timed in the process gets it; the record it returns
goes into each result.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None
from dataclasses import dataclass, field
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100/H200: 50 MiB)


@dataclass
class Stats:
    """Per-call times in seconds, in the order they were taken; on the CPU also the minor page
    faults of each sample (``faults``, the process's ``ru_minflt`` delta, read outside the timed
    region; empty on GPUs and where ``resource`` is missing): nonzero in the steady state means the
    call touched fresh memory."""

    samples: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in [0, 1] of the samples."""
        s = sorted(self.samples)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def iqr(self) -> float:
        """Interquartile range ``q75 - q25`` (seconds): the spread reported beside the median."""
        return self.quantile(0.75) - self.quantile(0.25)


@dataclass
class TimingPlan:
    """How many calls to make: ``warmup`` unrecorded calls, then samples until both ``min_reps``
    samples and ``min_time_s`` of measured time are reached, or ``max_reps`` samples, or (when
    ``max_time_s`` is set) once warm-up and samples took ``max_time_s`` of wall time, after one
    sample (one round) at least: a budget that keeps a run short on a slow or busy machine
    (:func:`measure` on a GPU sizes its run up front and does not read it)."""

    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 200
    min_time_s: float = 1.0
    clock: str = "wall"  # CPU only: "wall" (perf_counter) or "cpu" (this process's CPU time)
    max_time_s: float | None = None

    def more(self, samples: int, measured_s: float, started: float) -> bool:
        """Whether to take another sample (round) after ``samples`` of them, ``measured_s``
        seconds measured, the run having begun at ``time.perf_counter() == started``."""
        if samples >= self.max_reps:
            return False
        if samples and self.max_time_s is not None and time.perf_counter() - started >= self.max_time_s:
            return False
        return samples < self.min_reps or measured_s < self.min_time_s

    @classmethod
    def quick(cls) -> "TimingPlan":
        return cls(warmup=1, min_reps=3, max_reps=5, min_time_s=0.0)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
STEADY_MALLOPT = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}  # no mmapped blocks, no trimming
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_steady_record: dict | None = None  # set once applied: mallopt cannot be undone in a process


def _mallopt(param: int, value: int) -> int:
    """glibc's ``mallopt(param, value)`` (1 on success); one place for tests to stub."""
    return ctypes.CDLL(None).mallopt(param, value)


def steady_malloc(enable: bool = True) -> dict:
    """Make glibc's malloc keep and reuse freed memory (see the module docstring), once per
    process; returns what was done, for the result record: ``{"allocator": "glibc 2.36",
    "mallopt": {...}}`` when applied, ``{"allocator": ..., "mallopt": None, "why_not": "..."}``
    otherwise (``enable`` False, no glibc, or another allocator preloaded). Once applied it stays
    in force for the process, and later calls return the applied record whatever ``enable``."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        allocator = f"glibc {version().decode()}"
    except (OSError, AttributeError):
        return {"allocator": "not glibc", "mallopt": None, "why_not": "no glibc in this process"}
    preload = os.environ.get("LD_PRELOAD", "")
    other = [name for name in _PRELOADED_ALLOCATORS if name in preload]
    if other:
        return {"allocator": f"{other[0]} (LD_PRELOAD)", "mallopt": None,
                "why_not": f"LD_PRELOAD replaces malloc with {other[0]}: mallopt would not reach it"}
    global _steady_record
    if _steady_record is not None:
        return dict(_steady_record)  # applied earlier in this process: still in force
    if not enable:
        return {"allocator": allocator, "mallopt": None, "why_not": "left at glibc's defaults (asked)"}
    codes = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD}
    for name, value in STEADY_MALLOPT.items():
        if _mallopt(codes[name], value) != 1:  # mallopt returns 1 on success
            return {"allocator": allocator, "mallopt": None, "why_not": f"mallopt({name}, {value}) failed"}
    _steady_record = {"allocator": allocator, "mallopt": dict(STEADY_MALLOPT)}
    return dict(_steady_record)


def malloc_note(record: dict) -> str:
    """:func:`steady_malloc`'s record in a few words, for a result's header line."""
    if record.get("mallopt"):
        return f"{record['allocator']}, steady (" + ", ".join(f"{k}={v}" for k, v in record["mallopt"].items()) + ")"
    return f"{record.get('allocator')}, defaults ({record.get('why_not')})"


def ratio_stats(num: Stats, den: Stats) -> Stats:
    """Per-round ratios ``num / den`` of two series taken in the same rounds (as
    :func:`measure_interleaved` returns them): pairing cancels the load a round shares, so their
    median and IQR say more about the ratio than the ratio of the two medians does."""
    if len(num.samples) != len(den.samples):
        raise ValueError(f"ratio_stats: expected series of equal length, got {len(num.samples)} and "
                         f"{len(den.samples)}")
    return Stats([a / b for a, b in zip(num.samples, den.samples)])


_flush_buffers: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


def _minor_faults() -> int | None:
    """The process's minor page faults so far (all threads), or None without ``resource``."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_cpu_call(fn, clock, stats: Stats) -> float:
    """One CPU sample of ``fn()`` appended to ``stats`` (time and page faults); returns the time."""
    f0 = _minor_faults()
    t0 = clock()
    fn()
    dt = clock() - t0
    if f0 is not None:
        stats.faults.append(_minor_faults() - f0)
    stats.samples.append(dt)
    return dt


def _cpu_clock(plan: TimingPlan):
    """``time.process_time`` counts only this process's CPU seconds, so other jobs on a shared
    machine do not inflate it; at one thread it equals the wall time on an idle core."""
    return time.process_time if plan.clock == "cpu" else time.perf_counter


def measure(fn: Callable[[], object], device: torch.device | str, plan: TimingPlan) -> Stats:
    """Time ``fn()`` per call on ``device`` ("cpu" or a CUDA device) following ``plan``."""
    device = torch.device(device)
    started = time.perf_counter()
    for _ in range(plan.warmup):
        fn()
    if device.type == "cuda":
        return _measure_cuda(fn, device, plan)
    clock = _cpu_clock(plan)
    stats = Stats()
    total = 0.0
    while plan.more(len(stats.samples), total, started):
        total += _timed_cpu_call(fn, clock, stats)
    return stats


def _measure_cuda(fn, device, plan) -> Stats:
    flush = _l2_flush_buffer(device)
    torch.cuda.synchronize(device)
    # Estimate the per-call time to size the run without a sync per sample.
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(plan.max_reps, max(plan.min_reps, plan.min_time_s / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()  # evict L2 between samples
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return Stats([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])


def measure_interleaved(fns: list[Callable[[], object]], device: torch.device | str,
                        plan: TimingPlan, setup: Callable[[int], object] | None = None) -> list[Stats]:
    """Time several implementations round-robin, one sample of each per round.

    On a shared machine the load drifts over minutes; alternating the implementations (in an
    order rotated every round) exposes each to the same drift, so their ratio stays meaningful
    where back-to-back runs would not be (:func:`ratio_stats` pairs them per round). Same warm-up,
    sample counts and statistics as :func:`measure`; ``min_time_s`` applies to each
    implementation, ``max_time_s`` to all together. ``setup(i)``, when given, runs untimed before
    every call of ``fns[i]``, warm-up included (e.g. reseeding the RNG so each side sees the same
    random numbers).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    started = time.perf_counter()
    for i, fn in enumerate(fns):
        for _ in range(plan.warmup):
            if setup is not None:
                setup(i)
            fn()
    stats = [Stats() for _ in fns]
    if not fns:
        return stats
    flush = _l2_flush_buffer(device) if cuda else None
    clock = _cpu_clock(plan)
    rounds = 0
    while plan.more(rounds, min(sum(s.samples) for s in stats), started):
        shift = rounds % len(fns)
        for i in [(j + shift) % len(fns) for j in range(len(fns))]:
            if setup is not None:
                setup(i)
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[i]()
                end.record()
                end.synchronize()
                stats[i].samples.append(start.elapsed_time(end) * 1e-3)
            else:
                _timed_cpu_call(fns[i], clock, stats[i])
        rounds += 1
    return stats
