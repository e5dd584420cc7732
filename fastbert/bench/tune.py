"""Time-boxed tuning sweep of the Triton attention tile configs (the device check's last stage).

The Triton attention kernels take ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` from a heuristic
table (``_CONFIGS`` in :mod:`fastbert.backends.triton.attention`), never from runtime autotuning.
This sweep measures that table's choice against nearby candidates at BERT shapes on a GPU so that
one GPU run can update the table:

- cases: each kernel (``fwd``, ``dkdv``, ``dq``) x feature variant (``varlen``: the unpadded
  encoder; ``varlen_dropout``: its training step; ``mask``: the padded encoder) x seqlen 128 / 512,
  head_dim 64, bf16, 12 heads, 16384 tokens (batch 128 / 32), every sequence full;
- candidates: the table's config first, then the others of :data:`SPACE` by distance from it,
  at most ``--max-compiles`` compiles in all (one compile serves both seqlens: sequence lengths
  are not specialized);
- phase 1 compiles every candidate ahead of time for the GPU's arch in parallel worker processes
  (``fastbert.backends.triton._aot``, the launcher's own argument builders, nothing touches the
  GPU), which fills Triton's cache for phase 2 and gives registers and spills; a candidate that
  spills is not timed;
- phase 2 times each candidate (``triton.testing.do_bench``, median) after checking its output
  against the table config's on the same inputs (outputs poisoned with NaN first), until
  ``--time-budget`` seconds have passed, writing ``tune.json`` after every case.

Output (``--out``/tune.json, schema ``fastbert.tune/1``): per case the table config and its time,
every candidate (config, resources, time or why not), the best; and ``table``: per kernel the
config with the lowest total time over the measured cases that also compiles without spills in the
highest-pressure variant (mask + bias + dropout, the AOT gate's), in the table's format
``{("fwd", 16): {64: (BLOCK_M, BLOCK_N, num_warps, num_stages)}}`` (also as Python text).

``--dry-run`` (CPU, CI): plans the sweep, compiles one candidate for sm_90 ahead of time and
writes tune.json, so that the plumbing is tested where the sweep cannot run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

KINDS = ("fwd", "dkdv", "dq")
VARIANTS = {  # name -> (varlen, attention mask, dropout)
    "varlen": (True, False, False),
    "varlen_dropout": (True, False, True),
    "mask": (False, True, False),
}
SEQLENS = (128, 512)
TOKENS, NUM_HEADS, HEAD_DIM = 16384, 12, 64
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; dkdv: BLOCK_N keys per program, BLOCK_M
# query rows per inner step; fwd/dq: BLOCK_M query rows per program, BLOCK_N keys per step.
SPACE = {
    "fwd": ((64, 128), (16, 32, 64, 128), (4, 8), (1, 2, 3, 4)),
    "dkdv": ((16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)),
    "dq": ((32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3)),
}
SCHEMA = "fastbert.tune/1"


@dataclass(frozen=True)
class Case:
    """One sweep case: kernel kind and the BERT shape / dtype / features it is tuned for."""

    kind: str
    variant: str
    seqlen: int

    @property
    def batch(self) -> int:
        return TOKENS // self.seqlen

    def __str__(self) -> str:
        return f"{self.kind} {self.variant} s={self.seqlen}"


def table_config(kind: str) -> tuple[int, int, int, int]:
    """The shipped table's config for ``kind`` at head_dim 64, bf16 (compiled mode)."""
    import torch

    from fastbert.backends.triton.attention import attention_config

    return tuple(attention_config(kind, HEAD_DIM, torch.bfloat16, interpret=False))


def candidates(kind: str, table: tuple) -> list[tuple[int, int, int, int]]:
    """Every config of :data:`SPACE` for ``kind`` (plus the table's), the table's first, then by
    the number of fields that differ from it, then by the size of the change."""
    space = set(itertools.product(*SPACE[kind])) | {tuple(table)}

    def distance(c):
        return (sum(a != b for a, b in zip(c, table)),
                sum(abs(a.bit_length() - b.bit_length()) for a, b in zip(c, table)), c)

    return sorted(space, key=distance)


def plan(max_compiles: int) -> tuple[list[Case], dict[tuple[str, str], list[tuple]]]:
    """(cases in priority order, candidates per (kind, variant)), sharing ``max_compiles``
    compiles round-robin so every (kind, variant) gets its nearest candidates first."""
    cases = [Case(k, v, s) for v in VARIANTS for k in KINDS for s in SEQLENS]
    per = {(k, v): candidates(k, table_config(k)) for v in VARIANTS for k in KINDS}
    chosen: dict[tuple[str, str], list[tuple]] = {key: [] for key in per}
    for rank in range(max(len(c) for c in per.values())):
        for key, cands in per.items():
            if sum(map(len, chosen.values())) >= max_compiles:
                return cases, chosen
            if rank < len(cands):
                chosen[key].append(cands[rank])
    return cases, chosen


# ---- launches --------------------------------------------------------------------------------


def inputs(case: Case, device, seed: int = 0, highest_pressure: bool = False) -> dict:
    """The case's tensors (random on a GPU, meta for the ahead-of-time compile). ``highest_pressure``:
    the padded layout with mask, bias (with gradient) and dropout, the AOT spill gate's variant."""
    import torch

    varlen, mask, dropout = (False, True, True) if highest_pressure else VARIANTS[case.variant]
    b, s, h, d = case.batch, case.seqlen, NUM_HEADS, HEAD_DIM
    shape = (b * s, h, d) if varlen else (b, s, h, d)
    meta = str(device) == "meta"
    g = None if meta else torch.Generator(device=device).manual_seed(seed)

    def rand(*sh, dtype=torch.bfloat16):
        return torch.empty(*sh, dtype=dtype, device=device) if meta else torch.randn(
            *sh, dtype=dtype, device=device, generator=g)

    t = {n: rand(*shape) for n in ("q", "k", "v", "dout")}
    t.update({n: torch.empty(shape, dtype=torch.bfloat16, device=device) for n in ("out", "dq", "dk", "dv")})
    lse_shape = (h, b * s) if varlen else (b, h, s)
    t["lse"] = torch.empty(lse_shape, dtype=torch.float32, device=device)
    t["delta"] = torch.empty(lse_shape, dtype=torch.float32, device=device)
    t["cu_seqlens"] = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=device) if varlen else None
    t["attention_mask"] = None
    if mask:
        t["attention_mask"] = torch.ones(b, s, dtype=torch.bool, device=device)
        if not meta:  # a few padded keys per sequence, as a padded batch has
            t["attention_mask"][:, s - s // 8:] = torch.rand(b, 1, device=device, generator=g) < 0.5
    t["attn_bias"] = rand(b, h, s, s) if highest_pressure else None
    t["dbias"] = torch.empty(b, h, s, s, dtype=torch.float32, device=device) if highest_pressure else None
    t["seed"] = (torch.empty(2, dtype=torch.int64, device=device) if meta else
                 torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=g))
    t["dropout_p"] = 0.1 if dropout else 0.0
    return t


def launch(case: Case, config: tuple, t: dict):
    """``(kernel, grid, kwargs)`` of the case's kernel with ``config``, built by the launcher's own
    argument builders (``fwd_launch`` / ``bwd_launches``) and then given the candidate's tiles."""
    import triton

    from fastbert.backends.triton import attention as ta

    common = dict(attention_mask=t["attention_mask"], attn_bias=t["attn_bias"], cu_seqlens=t["cu_seqlens"],
                  max_seqlen=case.seqlen if t["cu_seqlens"] is not None else None, dropout_p=t["dropout_p"],
                  seed=t["seed"], softmax_scale=HEAD_DIM ** -0.5, allow_tf32=False)
    block_m, block_n, warps, stages = config
    if case.kind == "fwd":
        (bh, _), kw = ta.fwd_launch(t["q"], t["k"], t["v"], t["out"], t["lse"], **common)
        kernel, grid = ta._attn_fwd_kernel, (bh, triton.cdiv(case.seqlen, block_m))
    else:
        launches = ta.bwd_launches(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["dq"], t["dk"],
                                   t["dv"], t["dbias"], t["delta"], **common)
        kernel, (bh, _), kw = launches[1 if case.kind == "dkdv" else 2]
        grid = (bh, triton.cdiv(case.seqlen, block_n if case.kind == "dkdv" else block_m))
    kw = dict(kw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return kernel, grid, kw


def _label(kind: str, variant: str, config: tuple) -> str:
    return f"{kind} {variant} {'x'.join(map(str, config))}"


def aot_variants(items: list[tuple[str, str, tuple]], highest_pressure: bool = False):
    """:class:`~fastbert.backends.triton._aot.AotVariant` per (kind, variant, config)."""
    from fastbert.backends.triton._aot import AotVariant, split_launch

    out = []
    for kind, variant, config in items:
        t = inputs(Case(kind, variant, SEQLENS[0]), "meta", highest_pressure=highest_pressure)
        kernel, _, kw = launch(Case(kind, variant, SEQLENS[0]), config, t)
        out.append(AotVariant(_label(kind, "full" if highest_pressure else variant, config), kernel,
                              *split_launch(kernel, kw)))
    return out


def compile_ahead(items, arch: int, jobs: int, highest_pressure: bool = False, log=sys.stdout) -> dict:
    """{label: resource row or {"error": ...}} for ``items`` compiled for ``sm_<arch>``."""
    from fastbert.backends.triton._aot import check_variants

    variants = aot_variants(items, highest_pressure)
    rows, failures = check_variants(variants, (arch,), jobs=jobs, out=log)
    out = {r["label"]: r for r in rows}
    for f in failures:
        label = f.split(f" sm_{arch}")[0]
        if label not in out:
            out[label] = {"error": f}
    return out


# ---- timing (GPU) ----------------------------------------------------------------------------


def _outputs(case: Case, t: dict):
    return [t["out"]] if case.kind == "fwd" else ([t["dk"], t["dv"]] if case.kind == "dkdv" else [t["dq"]])


def _run(case, config, t):
    kernel, grid, kw = launch(case, config, t)
    kernel[grid](**kw)


def prepare(case: Case, t: dict) -> None:
    """Realistic lse / delta / outputs for the backward cases: the table's forward and preprocess."""
    from fastbert.backends.triton import attention as ta

    _run(Case("fwd", case.variant, case.seqlen), table_config("fwd"), t)
    if case.kind != "fwd":
        launches = ta.bwd_launches(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["dq"], t["dk"],
                                   t["dv"], t["dbias"], t["delta"], attention_mask=t["attention_mask"],
                                   attn_bias=None, cu_seqlens=t["cu_seqlens"],
                                   max_seqlen=case.seqlen if t["cu_seqlens"] is not None else None,
                                   dropout_p=t["dropout_p"], seed=t["seed"], softmax_scale=HEAD_DIM ** -0.5,
                                   allow_tf32=False)
        kernel, grid, kw = launches[0]
        kernel[grid](**kw)


def outputs(case: Case, config: tuple, t: dict) -> list:
    """The candidate's outputs on the case's inputs (NaN-poisoned first, so unwritten ones show)."""
    import torch

    for o in _outputs(case, t):
        o.fill_(float("nan"))
    _run(case, config, t)
    torch.cuda.synchronize()
    return [o.clone() for o in _outputs(case, t)]


def max_rel_diff(got: list, reference: list) -> float:
    """Largest ``max|a - b| / max|b|`` over the outputs; inf when an output is not finite."""
    import torch

    worst = 0.0
    for a, b in zip(got, reference):
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item())
    return worst


def time_ms(case: Case, config: tuple, t: dict) -> float:
    """Median time of one launch (``triton.testing.do_bench``: CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(lambda: _run(case, config, t), warmup=10, rep=40, return_mode="median")


def _env() -> dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
    return env


def table_text(table: dict) -> str:
    """``table`` as Python source lines for ``_CONFIGS`` (head_dim bucket 64, the 16-bit class)."""
    return "\n".join(f'("{kind}", 16): {{64: {tuple(cfg)}}},  # measured: {note}'
                     for kind, (cfg, note) in table.items())


def run(args) -> int:
    """Run the sweep for parsed ``args``; writes ``tune.json`` under ``args.out``; exit status."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune.json")
    t0 = time.monotonic()
    cases, chosen = plan(1 if args.dry_run else args.max_compiles)
    items = [(k, v, c) for (k, v), cfgs in chosen.items() for c in cfgs]
    result = {"schema": SCHEMA, "dry_run": args.dry_run, "space": {k: list(map(list, v)) for k, v in SPACE.items()},
              "shape": {"tokens": TOKENS, "num_heads": NUM_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
              "max_compiles": args.max_compiles, "time_budget_s": args.time_budget, "cases": [], "table": {}}

    def save():
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    print(f"tune: {len(cases)} cases, {len(items)} compiles planned (cap {args.max_compiles}), "
          f"{'dry run' if args.dry_run else f'budget {args.time_budget}s'}", flush=True)
    # Phase 1 before anything touches the GPU: the compile workers are forked.
    resources = compile_ahead(items, args.arch, args.jobs)
    result["compiled"] = len(resources)
    result["compile_s"] = round(time.monotonic() - t0, 1)
    result["env"] = _env()
    if args.dry_run:
        result["planned"] = [{"kind": k, "variant": v, "config": list(c)} for k, v, c in items]
        result["resources"] = resources
        save()
        bad = [r for r in resources.values() if "error" in r]
        print(f"tune --dry-run: compiled {len(resources)} candidate(s) for sm_{args.arch}, "
              f"{len(bad)} failed -> {path}")
        return 1 if bad or not resources else 0

    import torch

    if not torch.cuda.is_available():
        print("tune: no GPU (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    save()
    totals: dict[str, dict[tuple, list[float]]] = {k: {} for k in KINDS}  # accepted times per config
    for case in cases:
        if time.monotonic() - t0 > args.time_budget:
            result["stopped"] = f"time budget reached before {case}"
            break
        t = inputs(case, "cuda")
        prepare(case, t)
        table = table_config(case.kind)
        t1 = time.monotonic()
        reference = outputs(case, table, t)
        first_launch_s = time.monotonic() - t1  # small when phase 1 filled Triton's cache
        table_ms = time_ms(case, table, t)
        entry = {"kind": case.kind, "variant": case.variant, "seqlen": case.seqlen, "batch": case.batch,
                 "table_config": list(table), "table_ms": round(table_ms, 5),
                 "table_first_launch_s": round(first_launch_s, 3), "candidates": []}
        best = (table_ms, table)
        totals[case.kind].setdefault(table, []).append(table_ms)
        for config in chosen[(case.kind, case.variant)]:
            if config == table:
                continue
            if time.monotonic() - t0 > args.time_budget:
                entry["stopped"] = "time budget reached"
                break
            res = resources.get(_label(case.kind, case.variant, config), {})
            row = {"config": list(config), **{k: res[k] for k in ("registers", "spill_stores", "spill_loads",
                                                                   "shared_dynamic", "error") if k in res}}
            if "error" in res or (res.get("spill_stores") or 0) + (res.get("spill_loads") or 0) > 0:
                row["skipped"] = "compile failed" if "error" in res else "spills"
            else:
                try:
                    diff = max_rel_diff(outputs(case, config, t), reference)
                    ms = time_ms(case, config, t) if diff <= 2e-2 else None
                except Exception as exc:  # a config the kernel cannot run is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                else:
                    row.update(ms=None if ms is None else round(ms, 5), max_rel_diff=diff)
                    if ms is None:
                        row["rejected"] = f"output differs from the table config's by {diff:.3g} (relative)"
                    else:
                        totals[case.kind].setdefault(config, []).append(ms)
                        best = min(best, (ms, config))
            entry["candidates"].append(row)
        entry["best_config"], entry["best_ms"] = list(best[1]), round(best[0], 5)
        entry["speedup_over_table"] = round(table_ms / best[0], 3)
        result["cases"].append(entry)
        print(f"tune: {case}: table {table} {table_ms:.4f} ms, best {best[1]} {best[0]:.4f} ms "
              f"({table_ms / best[0]:.2f}x)", flush=True)
        save()
        del t
    # The table entry per kernel: the lowest total over the cases measured for it, among configs
    # that ran in all of them and also compile spill-free with every feature on (the AOT gate).
    for kind in KINDS:
        n = sum(1 for c in result["cases"] if c["kind"] == kind)
        table = table_config(kind)
        ranked = sorted((sum(ms), cfg) for cfg, ms in totals[kind].items() if n and len(ms) == n)
        for total, cfg in ranked:
            if cfg != table:
                row = next(iter(compile_ahead([(kind, "full", cfg)], args.arch, 1, highest_pressure=True).values()), {})
                if "error" in row or row.get("spill_stores") or row.get("spill_loads"):
                    continue
            result["table"][kind] = (list(cfg), f"{total:.4f} ms over {n} cases; the table's {tuple(table)}: "
                                                f"{sum(totals[kind][table]):.4f} ms")
            break
    result["table_text"] = table_text(result["table"])
    save()
    print("tune: suggested table entries (head_dim 64, fp16/bf16):\n" + result["table_text"], flush=True)
    return 0


def main(argv=None) -> int:
    """Command line: ``python -m fastbert.bench.tune [--dry-run] [--out DIR] ...``."""
    os.environ.pop("TRITON_INTERPRET", None)  # compiled Triton; before any kernel module is imported
    p = argparse.ArgumentParser(prog="python -m fastbert.bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="plan and compile one candidate ahead of time (no GPU)")
    p.add_argument("--out", default="bench-results", help="directory for tune.json")
    p.add_argument("--max-compiles", type=int, default=96, help="cap on ahead-of-time compiles (default 96)")
    p.add_argument("--time-budget", type=float, default=75.0, help="seconds for the whole sweep (default 75)")
    p.add_argument("--jobs", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                   help="parallel compile processes")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
