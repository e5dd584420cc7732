"""Per-op cost of ``fastbert.ops`` against the plain torch call it replaces, on the same input.

Two questions, forward and forward + backward, for every op:

- BERT shapes (8 x 128 tokens, hidden 768, 12 heads x 64, fp32): the ratio ``torch time /
  fastbert time`` (goal >= 0.9). Attention runs against ``F.scaled_dot_product_attention`` with
  the same boolean mask at ~50% and 100% fill; LayerNorm against ``F.layer_norm`` and the fused
  add & norm (``x_bias``, ``residual``) against the unfused ``F.layer_norm(x + x_bias +
  residual)``; GELU against ``F.gelu`` and bias-GELU against ``F.gelu(x + bias)``; GeGLU against
  the unfused ``a, g = x.chunk(2, -1); F.gelu(a) * g`` (ModernBERT's MLP; width 2304). fastbert's
  time includes all of its guarantees (masked keys never leak, empty rows are zeros).
- Tiny shapes (16 x 768; attention batch 1 x seqlen 16): the time fastbert adds per call, in
  microseconds (goal <= ~30 us); each sample is a loop of ``--reps`` calls.

Wall clock at ``--threads`` (2 by default; ``--clock cpu``: the process's CPU time, which other
jobs do not inflate, meant for ``--threads 1``), the two sides interleaved round by round
(:func:`fastbert.bench.timing.measure_interleaved`, 5 warm-up samples per side, >= 7 rounds),
medians and interquartile range, load average recorded before and after, and each side's median
minor page faults per call (shown when nonzero: the call touched fresh memory).

glibc's malloc is set to keep and reuse freed memory before anything is timed
(:func:`fastbert.bench.timing.steady_malloc`: no ``mmap`` per large block, no heap trimming), so
both sides are measured in the steady state instead of page-faulting on fresh 3-12 MiB blocks in
some runs and not others: with glibc's defaults, in about one run in eight a side re-faulted its
whole output (768-6113 pages) on every call, and the ratio of that row swung with it (LayerNorm
fwd 0.70-2.39x over four runs, 0.59-0.78x steady). Steady, only the first samples grow the heap,
and the warm-up absorbs them. ``--default-malloc`` leaves glibc's defaults; what was set is
printed in the header and stored under ``malloc``.

    python -m fastbert.bench.overhead [--quick] [--rounds 7] [--threads 2] [--clock wall|cpu]
                                      [--only NAME] [--default-malloc] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastbert.ops as ops
from fastbert.bench.timing import TimingPlan, malloc_note, measure_interleaved, steady_malloc


@dataclass
class Case:
    """One comparison: ``make()`` returns (fastbert fn, torch fn, leaves that take gradients)."""

    name: str
    kind: str  # "bert" (ratio) or "tiny" (added us per call)
    make: Callable[[], tuple]


def _mask(batch: int, seqlen: int, fill: float) -> torch.Tensor:
    """Right-padded bool mask, lengths spread evenly around ``fill`` (the first sequence full); one
    sequence is ``fill`` long (the spread would make it full: the tiny "mask 0.75" row measured an
    all-ones mask before)."""
    if fill >= 1.0:
        return torch.ones(batch, seqlen, dtype=torch.bool)
    if batch == 1:
        return torch.arange(seqlen)[None, :] < max(1, round(fill * seqlen))
    # from seqlen down to (2 fill - 1) seqlen: mean ~fill (fill 0.5: 128 .. 1 at seqlen 128)
    lengths = torch.linspace(1.0, 2 * fill - 1 + 1 / seqlen, batch).mul(seqlen).clamp(1, seqlen).long()
    return torch.arange(seqlen)[None, :] < lengths[:, None]


def _attention_case(batch, seqlen, fill, heads=12, head_dim=64):
    def make():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=g).requires_grad_() for _ in range(3))
        mask = None if fill is None else _mask(batch, seqlen, fill)
        sdpa_mask = None if mask is None else mask[:, None, None, :]

        def fb():
            return ops.attention(q, k, v, attention_mask=mask)

        def th():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=sdpa_mask).transpose(1, 2)
        return fb, th, (q, k, v)
    return make


def _layer_norm_case(rows, hidden, fused):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, hidden, generator=g).requires_grad_()
        w, b = (torch.randn(hidden, generator=g).requires_grad_() for _ in range(2))
        if not fused:
            return (lambda: ops.layer_norm(x, w, b, eps=1e-12),
                    lambda: F.layer_norm(x, (hidden,), w, b, 1e-12), (x, w, b))
        res = torch.randn(rows, hidden, generator=g).requires_grad_()
        xb = torch.randn(hidden, generator=g).requires_grad_()
        return (lambda: ops.layer_norm(x, w, b, eps=1e-12, residual=res, x_bias=xb),
                lambda: F.layer_norm(x + xb + res, (hidden,), w, b, 1e-12), (x, w, b, res, xb))
    return make


def _gelu_case(rows, hidden, with_bias):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, hidden, generator=g).requires_grad_()
        if not with_bias:
            return lambda: ops.gelu(x), lambda: F.gelu(x), (x,)
        b = torch.randn(hidden, generator=g).requires_grad_()
        return lambda: ops.gelu(x, bias=b), lambda: F.gelu(x + b), (x, b)
    return make


def _geglu_case(rows, width, with_bias):
    """GeGLU against the unfused sequence ModernBERT's MLP runs (chunk, F.gelu, multiply)."""
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, width, generator=g).requires_grad_()

        def unfused(z):
            a, gate = z.chunk(2, dim=-1)
            return F.gelu(a) * gate
        if not with_bias:
            return lambda: ops.geglu(x), lambda: unfused(x), (x,)
        b = torch.randn(width, generator=g).requires_grad_()
        return lambda: ops.geglu(x, bias=b), lambda: unfused(x + b), (x, b)
    return make


def cases(quick: bool = False) -> list[Case]:
    """The comparisons; ``quick`` shrinks the BERT shapes (a smoke run, not a measurement)."""
    batch, seqlen = (2, 32) if quick else (8, 128)
    rows = batch * seqlen
    out = [
        Case(f"attention b{batch} s{seqlen} 12x64 fill 0.5", "bert", _attention_case(batch, seqlen, 0.5)),
        Case(f"attention b{batch} s{seqlen} 12x64 fill 1.0", "bert", _attention_case(batch, seqlen, 1.0)),
        Case(f"attention b{batch} s{seqlen} 12x64 no mask", "bert", _attention_case(batch, seqlen, None)),
        Case(f"layer_norm {rows}x768", "bert", _layer_norm_case(rows, 768, False)),
        Case(f"add&norm {rows}x768 (x_bias, residual)", "bert", _layer_norm_case(rows, 768, True)),
        Case(f"gelu {rows}x3072", "bert", _gelu_case(rows, 3072, False)),
        Case(f"bias-gelu {rows}x3072", "bert", _gelu_case(rows, 3072, True)),
        Case(f"geglu {rows}x2304", "bert", _geglu_case(rows, 2304, False)),  # ModernBERT-base's Wi output
        Case(f"bias-geglu {rows}x2304", "bert", _geglu_case(rows, 2304, True)),
        Case("attention b1 s16 12x64 no mask", "tiny", _attention_case(1, 16, None)),
        Case("attention b1 s16 12x64 mask 0.75", "tiny", _attention_case(1, 16, 0.75)),
        Case("layer_norm 16x768", "tiny", _layer_norm_case(16, 768, False)),
        Case("add&norm 16x768", "tiny", _layer_norm_case(16, 768, True)),
        Case("gelu 16x768", "tiny", _gelu_case(16, 768, False)),
        Case("bias-gelu 16x768", "tiny", _gelu_case(16, 768, True)),
        Case("geglu 16x2304", "tiny", _geglu_case(16, 2304, False)),
    ]
    return out


def _timed(fn, leaves, backward: bool, reps: int):
    """A callable running ``fn`` ``reps`` times (with a backward pass of fixed gradients)."""
    if not backward:
        def fwd():
            with torch.no_grad():
                for _ in range(reps):
                    fn()
        return fwd
    grad = {}

    def fwd_bwd():
        for _ in range(reps):
            y = fn()
            if "g" not in grad:
                grad["g"] = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            y.backward(grad["g"])
            for t in leaves:
                t.grad = None
    return fwd_bwd


def run(quick: bool = False, rounds: int = 7, threads: int = 2, reps: int = 200, only: str | None = None,
        steady: bool = False, clock: str = "wall") -> dict:
    """Measure every case (``steady``: :func:`steady_malloc` first, process-wide and for good, so
    only the command line asks for it; else the record says what is in force; ``clock``: ``"wall"`` or
    ``"cpu"``, the process's CPU time, meant for ``threads=1`` on a loaded machine); returns a
    JSON-able dict (times in seconds per call, minor page faults per call)."""
    malloc = steady_malloc(steady)
    torch.set_num_threads(threads)
    plan = TimingPlan(warmup=1 if quick else 5, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock=clock)
    load_before = os.getloadavg()
    rows = []
    for case in cases(quick):
        if only and only not in case.name:
            continue
        fb, th, leaves = case.make()
        n = reps if case.kind == "tiny" else 1
        for direction, backward in (("fwd", False), ("fwd+bwd", True)):
            s_fb, s_th = measure_interleaved([_timed(fb, leaves, backward, n), _timed(th, leaves, backward, n)],
                                             "cpu", plan)
            row = dict(case=case.name, kind=case.kind, direction=direction, calls_per_sample=n,
                       fastbert_s=s_fb.median / n, torch_s=s_th.median / n,
                       fastbert_iqr_s=s_fb.iqr / n, torch_iqr_s=s_th.iqr / n,
                       ratio=s_th.median / s_fb.median, added_us=(s_fb.median - s_th.median) / n * 1e6,
                       fastbert_faults=_faults_per_call(s_fb, n), torch_faults=_faults_per_call(s_th, n))
            rows.append(row)
    load_after = os.getloadavg()
    return dict(benchmark="fastbert.ops overhead vs plain torch", quick=quick, rounds=rounds, threads=threads,
                clock=clock, malloc=malloc, loadavg_before=load_before, loadavg_after=load_after, torch=torch.__version__,
                cpu=platform.processor(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=rows)


def _faults_per_call(stats, calls_per_sample: int) -> float | None:
    """Median minor page faults per call over the samples (None where they are not counted)."""
    return statistics.median(stats.faults) / calls_per_sample if stats.faults else None


def format_rows(res: dict) -> str:
    """The table: BERT-shape rows with their ratio (goal >= 0.9), tiny rows with the added us."""
    lines = [f"{res['benchmark']}: {res['threads']} threads, {res['clock']} clock, {res['rounds']} rounds, load "
             f"{res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}, malloc: {malloc_note(res['malloc'])}"
             + (" (QUICK: smoke run, not a measurement)" if res["quick"] else "")]
    for r in res["rows"]:
        fb, th = r["fastbert_s"], r["torch_s"]
        unit, scale = ("ms", 1e3) if r["kind"] == "bert" else ("us", 1e6)
        verdict = (f"{r['ratio']:.2f}x torch" if r["kind"] == "bert" else f"+{r['added_us']:.1f} us/call")
        faults = (f"  page faults/call {r['fastbert_faults']:g} vs {r['torch_faults']:g}"
                  if r.get("fastbert_faults") or r.get("torch_faults") else "")
        lines.append(f"  {r['case']:42s} {r['direction']:8s} fastbert {fb * scale:9.2f} {unit} "
                     f"(iqr {r['fastbert_iqr_s'] * scale:.2f})  torch {th * scale:9.2f} {unit} "
                     f"(iqr {r['torch_iqr_s'] * scale:.2f})  {verdict}{faults}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Command line: run the comparisons, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small BERT shapes, 1 round, few calls")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=200, help="calls per sample at the tiny shapes")
    p.add_argument("--only", help="run only the cases whose name contains this")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (use with --threads 1 on a loaded machine)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's mmap / trim thresholds at their defaults (see the module docstring)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    rounds, reps = (1, 5) if a.quick else (a.rounds, a.reps)
    res = run(a.quick, rounds, a.threads, reps, a.only, steady=not a.default_malloc, clock=a.clock)
    print(format_rows(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
