"""Timing: every sample kept, summarised by the median and the interquartile range.

GPU: each sample is one call bracketed by CUDA events on the current stream, with the L2 cache
flushed (a 256 MiB buffer overwritten) before it, so no call reads what the previous one left in
L2; warm-up calls (Triton compilation, autotuning, ``torch.compile``, allocator growth) run first
and are not recorded. CPU: the same protocol with ``time.perf_counter`` around each call under a
fixed ``torch.set_num_threads`` (no cache flush: a CPU run measures what a user sees), or, with
``clock="cpu"`` at one thread, the process's CPU time, which other jobs on a shared machine do
not inflate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100/H200: 50 MiB)


@dataclass
class Stats:
    """Per-call times in seconds, in the order they were taken."""

    samples: list[float] = field(default_factory=list)

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


_flush_buffers: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


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
        t0 = clock()
        fn()
        dt = clock() - t0
        stats.samples.append(dt)
        total += dt
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
                        plan: TimingPlan) -> list[Stats]:
    """Time several implementations round-robin, one sample of each per round.

    On a shared machine the load drifts over minutes; alternating the implementations (in an
    order rotated every round) exposes each to the same drift, so their ratio stays meaningful
    where back-to-back runs would not be. Same warm-up, sample counts and statistics as
    :func:`measure`; ``min_time_s`` applies to each implementation, ``max_time_s`` to all together.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    started = time.perf_counter()
    for fn in fns:
        for _ in range(plan.warmup):
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
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[i]()
                end.record()
                end.synchronize()
                stats[i].samples.append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = clock()
                fns[i]()
                stats[i].samples.append(clock() - t0)
        rounds += 1
    return stats
