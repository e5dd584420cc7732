"""Local-window attention's saving: windowed vs global attention cost per token as seqlen grows.

``python -m fastbert.bench.window [--quick] [--seqlens 512,1024,...] [--threads N] [--json PATH]``

One sequence of ``seqlen`` tokens in the varlen layout (ModernBERT runs unpadded), ModernBERT-base
heads (12 x 64), fp32 on the CPU, the torch backend: global attention (SDPA per sequence,
forward and backward through aten's CPU flash kernels) against a 128-token window,
``window=(64, 64)`` (ModernBERT's ``local_attention=128``; computed blockwise). For each seqlen
and direction (``fwd``; ``fwd+bwd`` = the forward plus the backward of a fixed output gradient)
the two run in interleaved rounds (:func:`fastbert.bench.timing.measure_interleaved`), so load
drift hits both alike. Reported: median time per call and per token, the interquartile range
(spread), window / global, and the window's per-token cost relative to the shortest seqlen (the
goal: flat, since its work is seqlen x window where global's is seqlen^2); the load average
before and after the run. FLOPs per call (multiply-adds x 2, forward ``4 L K d H`` with K the keys
a row meets: L for global, <= 129 for the window; fwd+bwd 3.5x forward) give the GFLOP/s printed
beside.

Before timing, the windowed output at the shortest seqlen is checked against global attention
with the same band given as a ``-inf`` bias (the reference backend), so a wrong kernel is not
timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from fastbert.bench.timing import TimingPlan, measure_interleaved
from fastbert.ops import attention

SEQLENS = (512, 1024, 2048, 4096, 8192)
WINDOW = (64, 64)


def _inputs(seqlen: int, heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + seqlen)
    q, k, v, dout = (torch.randn(seqlen, heads, head_dim, generator=g) for _ in range(4))
    cu = torch.tensor([0, seqlen], dtype=torch.int32)
    return q, k, v, dout, cu


def _fn(direction: str, q, k, v, dout, cu, window):
    seqlen = q.shape[0]
    if direction == "fwd":
        def run():
            with torch.no_grad():
                attention(q, k, v, cu_seqlens=cu, max_seqlen=seqlen, window=window, backend="torch")
        return run
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

    def run_bwd():
        out = attention(qq, kk, vv, cu_seqlens=cu, max_seqlen=seqlen, window=window, backend="torch")
        torch.autograd.grad(out, (qq, kk, vv), dout)
    return run_bwd


def attention_flops(seqlen: int, heads: int, head_dim: int, window, direction: str) -> float:
    """FLOPs of the score and value products: ``4 * sum_i keys(i) * head_dim * heads`` forward, with
    keys(i) the keys row i meets; backward 2.5x forward (dV, dP, dQ, dK plus the recomputed S)."""
    if window is None:
        keys = seqlen * seqlen
    else:
        i = torch.arange(seqlen)
        keys = int(((i + window[1]).clamp(max=seqlen - 1) - (i - window[0]).clamp(min=0) + 1).sum())
    fwd = 4.0 * keys * head_dim * heads
    return fwd if direction == "fwd" else fwd * 3.5


def check(seqlen: int, heads: int, head_dim: int) -> float:
    """Max abs difference of the windowed torch backend against global attention with the band as
    a ``-inf`` bias (reference backend, padded layout); raises if above 1e-4."""
    q, k, v, _, cu = _inputs(seqlen, heads, head_dim, seed=1)
    got = attention(q, k, v, cu_seqlens=cu, max_seqlen=seqlen, window=WINDOW, backend="torch")
    i = torch.arange(seqlen)
    band = (i[None, :] >= i[:, None] - WINDOW[0]) & (i[None, :] <= i[:, None] + WINDOW[1])
    bias = torch.zeros(seqlen, seqlen).masked_fill(~band, float("-inf"))
    want = attention(q[None], k[None], v[None], attn_bias=bias, backend="reference")[0]
    err = (got - want).abs().max().item()
    if not err <= 1e-4:
        raise AssertionError(f"windowed attention differs from the band-masked reference by {err:.3e}")
    return err


def run(seqlens=SEQLENS, *, heads: int = 12, head_dim: int = 64, plan: TimingPlan | None = None,
        directions=("fwd", "fwd+bwd"), out=sys.stdout) -> dict:
    """Measure every (seqlen, direction); returns the results as a JSON-ready dict."""
    plan = plan or TimingPlan(warmup=1, min_reps=5, max_reps=50, min_time_s=2.0, max_time_s=120.0)
    load_before = os.getloadavg()
    err = check(min(seqlens), heads, head_dim)
    rows = []
    for seqlen in seqlens:
        q, k, v, dout, cu = _inputs(seqlen, heads, head_dim)
        for direction in directions:
            fns = [_fn(direction, q, k, v, dout, cu, w) for w in (None, WINDOW)]
            glob, win = measure_interleaved(fns, "cpu", plan)
            flops = [attention_flops(seqlen, heads, head_dim, w, direction) for w in (None, WINDOW)]
            rows.append(dict(seqlen=seqlen, direction=direction, rounds=len(win.samples),
                             global_s=glob.median, global_iqr_s=glob.iqr, window_s=win.median,
                             window_iqr_s=win.iqr, ratio=win.median / glob.median,
                             global_gflops=flops[0] / glob.median / 1e9, window_gflops=flops[1] / win.median / 1e9))
            _print_row(rows[-1], rows, out)
    result = dict(benchmark="window attention vs global (torch backend, CPU, fp32, varlen, 1 sequence)",
                  window=list(WINDOW), heads=heads, head_dim=head_dim, threads=torch.get_num_threads(),
                  torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  load_before=list(load_before), load_after=list(os.getloadavg()), check_max_abs_err=err,
                  rows=rows)
    print(f"load average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}; "
          f"threads {result['threads']}; check vs band-masked reference: max abs err {err:.1e}", file=out)
    return result


_HEADER = (f"{'seqlen':>6} {'dir':>7} {'rounds':>6} {'global us/tok':>14} {'(iqr)':>8} {'window us/tok':>14} "
           f"{'(iqr)':>8} {'win/glob':>8} {'win vs first':>12} {'GFLOP/s g/w':>12}")


def _print_row(row: dict, rows: list, out) -> None:
    if len(rows) == 1:
        print(_HEADER, file=out)
    first = next(r for r in rows if r["direction"] == row["direction"])
    per_tok = lambda s: s / row["seqlen"] * 1e6  # noqa: E731
    rel = (row["window_s"] / row["seqlen"]) / (first["window_s"] / first["seqlen"])
    print(f"{row['seqlen']:>6} {row['direction']:>7} {row['rounds']:>6} {per_tok(row['global_s']):>14.3f} "
          f"{per_tok(row['global_iqr_s']):>8.3f} {per_tok(row['window_s']):>14.3f} "
          f"{per_tok(row['window_iqr_s']):>8.3f} {row['ratio']:>8.3f} {rel:>12.2f} "
          f"{row['global_gflops']:>5.1f}/{row['window_gflops']:<6.1f}",
          file=out, flush=True)


def main(argv=None) -> int:
    """``python -m fastbert.bench.window``: windowed vs global attention on the torch backend (one
    sequence, fp32, forward and forward + backward) at each seqlen, interleaved rounds; prints the
    median cost per token in microseconds with its IQR, window / global and GFLOP/s (valid pairs
    only), and the load average; ``--json`` writes every row. Returns the exit status (0)."""
    p = argparse.ArgumentParser(prog="python -m fastbert.bench.window", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: seqlens 256 and 512, 2 heads, 2 rounds")
    p.add_argument("--seqlens", type=str, default=None, help="comma-separated (default 512,...,8192)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    seqlens = tuple(int(s) for s in a.seqlens.split(",")) if a.seqlens else ((256, 512) if a.quick else SEQLENS)
    heads = a.heads or (2 if a.quick else 12)
    plan = TimingPlan(warmup=1, min_reps=2, max_reps=2, min_time_s=0.0) if a.quick else None
    result = run(seqlens, heads=heads, head_dim=a.head_dim, plan=plan)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
