"""``fastbert bench``: run benchmark cases, print a table, write JSON and PNG plots.

Every case times each implementation that can run here (fastbert's backends and the competitors)
after checking its result against the reference once; skipped implementations are listed with the
reason. Output goes to ``--out DIR`` (default ``bench-results``): ``bench.json`` (device, versions,
build info, git sha, timestamp, options, every sample of every implementation), ``bench.txt`` (the
table) and ``<op>.png`` plots of rate vs size (``--plot combined``: one ``bench.png``). The JSON is
rewritten after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import torch

import fastbert
from fastbert import env as fastbert_env
from fastbert.bench import attention, encoder, gelu, layer_norm
from fastbert.bench.core import MODEL_SHAPES, Case, Options, row_sizes
from fastbert.bench.report import CHECK_LEGEND, table_lines, write_json, write_plots
from fastbert.bench.timing import TimingPlan, measure, measure_interleaved

OPS = {"attention": attention, "layer_norm": layer_norm, "gelu": gelu, "encoder": encoder}
DTYPES = {k: v for k, v in fastbert_env.DTYPES.items() if v != torch.float64}
SCHEMA = "fastbert.bench/1"


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(t) for t in text.split(",") if t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``fastbert bench`` argument parser (every option is described in its help)."""
    p = argparse.ArgumentParser(
        prog="fastbert bench",
        description="Benchmark fastbert's ops and encoder against PyTorch and Hugging Face "
                    "implementations measured in the same run; prints a table and writes JSON "
                    "and PNG plots (with matplotlib, in the demo extra) to --out, saying where.")
    p.add_argument("--op", action="append", choices=[*OPS, "all"],
                   help="what to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repetitions, no torch.compile competitors (the CPU encoder "
                        "runs 2 layers of BERT shape at batch x seqlen 8x64 and 4x128; see the README "
                        "for measured times)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--model", type=_csv(str), default=("base",),
                   help=f"BERT shapes the sizes come from, comma-separated of {sorted(MODEL_SHAPES)} (default: base)")
    p.add_argument("--fill", type=float, default=0.5,
                   help="mean fraction of real tokens per padded batch (attention, encoder; default 0.5)")
    p.add_argument("--seqlens", type=_csv(int), help="sequence lengths (attention, encoder)")
    p.add_argument("--batch", type=int, help="batch size (attention, encoder)")
    p.add_argument("--rows", type=_csv(int), help="row counts = tokens (layer_norm, gelu)")
    p.add_argument("--layers", type=int, help="encoder layers (default: the model's; 2 with --quick on the CPU)")
    p.add_argument("--direction", type=_csv(str), default=("fwd", "bwd"), help="ops: fwd,bwd (default both)")
    p.add_argument("--mode", type=_csv(str), default=("infer", "train"), help="encoder: infer,train (default both)")
    p.add_argument("--backend", action="append",
                   help="fastbert backend(s) to time (repeatable; default: every available one but the reference)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile competitors")
    p.add_argument("--no-cuda-graphs", action="store_true", help="skip the CUDA-graph-replayed encoder rows")
    p.add_argument("--reps", type=int, help="samples per implementation (overrides the plan's count and time)")
    p.add_argument("--warmup", type=int, help="unrecorded warm-up calls per implementation")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU timing: wall clock (default) or this process's CPU time, which other jobs "
                        "on a shared machine do not inflate (sets --threads 1, where it equals the wall "
                        "time on an idle core)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    p.add_argument("--plot", choices=["per-op", "combined", "none"], default="per-op",
                   help="one PNG per op (default), one bench.png in all, or none")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time a case's implementations round-robin (default: on for the CPU, where "
                        "the machine may be shared; off on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def options_from(args) -> Options:
    """Parsed arguments -> :class:`Options`, filling device, dtype and size defaults."""
    ops = tuple(OPS) if not args.op or "all" in args.op else tuple(dict.fromkeys(args.op))
    device = args.device or fastbert_env.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastbert bench: --device cuda, but torch sees no CUDA GPU")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    for m in args.model:
        if m not in MODEL_SHAPES:
            raise SystemExit(f"fastbert bench: --model: expected names from {sorted(MODEL_SHAPES)}, got {m!r}")
    for d in args.direction:
        if d not in ("fwd", "bwd"):
            raise SystemExit(f"fastbert bench: --direction: expected fwd and/or bwd, got {d!r}")
    for m in args.mode:
        if m not in ("infer", "train"):
            raise SystemExit(f"fastbert bench: --mode: expected infer and/or train, got {m!r}")
    from fastbert.backends import all_backends

    known = all_backends()
    for b in args.backend or ():
        if b not in known:
            raise SystemExit(f"fastbert bench: --backend: expected names from {sorted(known)}, got {b!r}")
    if not 0.0 < args.fill <= 1.0:
        raise SystemExit(f"fastbert bench: --fill: expected 0 < fill <= 1, got {args.fill}")
    return Options(ops=ops, device=device, dtype=dtype, quick=args.quick, models=tuple(args.model),
                   fill=args.fill, backends=tuple(args.backend) if args.backend else None,
                   compile=not (args.quick or args.no_compile), directions=tuple(args.direction),
                   encoder_modes=tuple(args.mode), seqlens=args.seqlens, batch=args.batch,
                   layers=args.layers, rows=args.rows, cuda_graphs=not args.no_cuda_graphs, seed=args.seed)


def timing_plan(opts: Options) -> TimingPlan:
    """Warm-up and repetition counts for the device and ``--quick``."""
    if opts.device == "cpu":
        return TimingPlan.quick() if opts.quick else TimingPlan(warmup=2, min_reps=5, max_reps=50, min_time_s=1.0)
    if opts.quick:
        return TimingPlan(warmup=3, min_reps=10, max_reps=50, min_time_s=0.1)
    return TimingPlan(warmup=5, min_reps=20, max_reps=500, min_time_s=0.5)


def _git() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbert.__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"sha": sha, "dirty": dirty if sha else None}
    except Exception as exc:
        return {"sha": None, "error": f"{type(exc).__name__}: {exc}"}


def environment(opts: Options) -> dict:
    """Device, versions, build info (``fastbert env``'s report), git sha and thread count."""
    env: dict = {"device": opts.device, "threads": torch.get_num_threads(), "platform": platform.platform(),
                 "git": _git()}
    try:
        env.update(fastbert_env.collect_env(opts.device, str(opts.dtype).replace("torch.", "")))
    except Exception as exc:  # a broken backend report must not lose the run: keep the essentials
        env["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "fastbert": fastbert.__version__}
        env["collect_env_error"] = f"{type(exc).__name__}: {exc}"
    if opts.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = (env.get("device") or {}).get("cpu") if isinstance(env.get("device"), dict) else None
        env["device_name"] = env["device_name"] or platform.processor() or platform.machine()
    return env


def _result(impl, status, note=None, **kw) -> dict:
    return {"impl": impl.name, "kind": impl.kind, "default": False, "status": status, "note": note,
            "check": None, "info": {}, "samples_s": [], "median_s": None, "iqr_s": None, "q25_s": None,
            "q75_s": None, "rate": None, "rate_unit": None, "fastbert_speedup": None, **kw}


def run_case(case: Case, plan: TimingPlan, tick=lambda name: None, interleave: bool = False) -> dict:
    """Check and time every implementation of ``case``; returns its JSON record.

    ``interleave``: prepare and check all implementations first, then time them round-robin
    (:func:`measure_interleaved`), so load drift on a shared machine hits all alike; otherwise
    each is prepared, checked, timed and released in turn (less memory).
    """
    t_case = time.perf_counter()
    results: list = [None] * len(case.impls)
    ready: list = []  # (index, impl, prepared, check) awaiting interleaved timing
    ref = None
    ref_error = None
    for idx, impl in enumerate(case.impls):
        tick(impl.name)
        if impl.skip is not None:
            results[idx] = _result(impl, "skipped", impl.skip)
            continue
        if ref is None and ref_error is None:
            try:
                ref = case.reference()
            except Exception as exc:
                ref_error = f"reference failed: {type(exc).__name__}: {exc}"
        if ref_error is not None:
            results[idx] = _result(impl, "error", ref_error)
            continue
        prepared = None
        try:
            prepared = impl.prepare()
            check = case.check(prepared.result(), ref)
            if interleave:
                ready.append((idx, impl, prepared, check))
                continue
            results[idx] = _timed_result(impl, prepared, check, measure(prepared.run, case.device, plan), case)
        except Exception as exc:
            results[idx] = _error_result(impl, exc)
        finally:
            del prepared
            _release(case)
    if ready:
        try:
            all_stats = measure_interleaved([p.run for _, _, p, _ in ready], case.device, plan)
            for (idx, impl, prepared, check), stats in zip(ready, all_stats):
                results[idx] = _timed_result(impl, prepared, check, stats, case)
        except Exception as exc:  # which one failed is unknown: all of this round are errors
            for idx, impl, _, _ in ready:
                results[idx] = _error_result(impl, exc)
        finally:
            ready.clear()
            _release(case)
    _ratios(results)
    return {"op": case.op, "direction": case.direction, "label": case.label, "params": case.params,
            "x": case.x, "x_name": case.x_name, "x_tick": case.x_tick, "dtype": str(case.dtype).replace("torch.", ""),
            "device": case.device, "work": {"amount": case.work.amount, "unit": case.work.unit,
                                            "formula": case.work.formula},
            "notes": case.notes, "elapsed_s": round(time.perf_counter() - t_case, 3),
            "timing": "interleaved" if interleave else "sequential", "results": results}


def _timed_result(impl, prepared, check, stats, case) -> dict:
    rate, unit = case.work.rate(stats.median)
    r = _result(impl, "ok", check=check, info=dict(prepared.info), samples_s=stats.samples,
                median_s=stats.median, iqr_s=stats.iqr, q25_s=stats.quantile(0.25),
                q75_s=stats.quantile(0.75), rate=rate, rate_unit=unit)
    r["default"] = impl.default
    return r


def _error_result(impl, exc) -> dict:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _result(impl, "error", f"{type(exc).__name__}: {first}{where}")


def _release(case) -> None:
    if case.op == "encoder":
        gc.collect()
    if torch.device(case.device).type == "cuda":
        torch.cuda.empty_cache()


def _ratios(results: list[dict]) -> None:
    """fastbert's speedup over each row: row median / the default fastbert row's median."""
    ok = [r for r in results if r["status"] == "ok"]
    base = next((r for r in ok if r["default"]), None) or next((r for r in ok if r["kind"] == "fastbert"), None)
    for r in results:
        r["default"] = r is base
    if base is None:
        return
    base["speedup_vs"] = {}
    for r in ok:
        if r is not base:
            r["fastbert_speedup"] = r["median_s"] / base["median_s"]
            base["speedup_vs"][r["impl"]] = r["fastbert_speedup"]


class _Interrupted(BaseException):  # not caught by the per-implementation handler
    pass


def _on_sigterm(signum, frame):  # `timeout` sends SIGTERM: finish writing what was measured
    raise _Interrupted(f"signal {signum}")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="impl", file=sys.stderr, dynamic_ncols=True, leave=False)


def describe(opts: Options, plan: TimingPlan, interleave: bool = False) -> list[str]:
    """What is being run, stated in the output (sizes, layers, repetitions)."""
    lines = [f"fastbert {fastbert.__version__} bench | device {opts.device} | dtype "
             f"{str(opts.dtype).replace('torch.', '')} | threads {torch.get_num_threads()} | "
             f"{'quick' if opts.quick else 'full'} | models {','.join(opts.models)} | fill {opts.fill}"]
    lines.append(f"timing: {plan.warmup} warm-up calls excluded, then {plan.min_reps}..{plan.max_reps} samples "
                 f"(>= {plan.min_time_s} s measured); median and IQR"
                 + ("; CUDA events, L2 flushed before each sample" if opts.device == "cuda" else
                    "; process CPU time (1 thread)" if plan.clock == "cpu" else "; wall clock")
                 + ("; a case's implementations interleaved round-robin" if interleave else ""))
    for op in opts.ops:
        if op in ("attention", "encoder"):
            szs = OPS[op].sizes(opts)
            extra = ""
            if op == "encoder":
                extra = f", layers {','.join(str(encoder.num_layers(opts, m)) for m in opts.models)}, modes {','.join(opts.encoder_modes)}"
            lines.append(f"{op}: (seqlen, batch) {szs}{extra}")
        else:
            lines.append(f"{op}: rows {list(row_sizes(opts))}, directions {','.join(opts.directions)}")
    if not opts.compile:
        lines.append("torch.compile competitors: off")
    lines.append(CHECK_LEGEND)
    return lines


def main(argv=None) -> int:
    """Run the benchmarks of ``argv`` (see ``fastbert bench --help``).

    Returns 0 when every fastbert implementation that ran passed its reference check, else 1
    (a competitor's error or mismatch is reported in the table and JSON, not in the status).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["patched"]:  # patch() vs plain transformers / sentence-transformers (its own options)
        from fastbert.bench import patched

        return patched.main(argv[1:])
    args = build_parser().parse_args(argv)
    opts = options_from(args)
    if args.clock == "cpu":
        if opts.device != "cpu":
            raise SystemExit("fastbert bench: --clock cpu: only for --device cpu (GPU timing uses CUDA events)")
        if args.threads not in (None, 1):
            raise SystemExit(f"fastbert bench: --clock cpu: needs --threads 1 (CPU time sums threads), got {args.threads}")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = timing_plan(opts)
    plan.clock = args.clock
    if args.reps is not None:
        if args.reps < 1:
            raise SystemExit(f"fastbert bench: --reps: expected >= 1, got {args.reps}")
        plan.min_reps = plan.max_reps = args.reps
        plan.min_time_s = 0.0
    if args.warmup is not None:
        if args.warmup < 0:
            raise SystemExit(f"fastbert bench: --warmup: expected >= 0, got {args.warmup}")
        plan.warmup = args.warmup
    interleave = args.interleave if args.interleave is not None else opts.device == "cpu"
    os.makedirs(args.out, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    header = describe(opts, plan, interleave)
    for line in header:
        print(line, flush=True)
    record = {"schema": SCHEMA, "timestamp": started.isoformat(timespec="seconds"),
              "command": ["fastbert", "bench", *(argv if argv is not None else sys.argv[1:])],
              "options": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
                          for k, v in vars(opts).items()},
              "timing": {"warmup": plan.warmup, "min_reps": plan.min_reps, "max_reps": plan.max_reps,
                         "min_time_s": plan.min_time_s,
                         "method": "cuda events, L2 flush" if opts.device == "cuda" else
                         ("process cpu time" if plan.clock == "cpu" else "wall clock"),
                         "order": "interleaved (round-robin per case)" if interleave else "sequential",
                         "statistics": "median, IQR (q75 - q25)"},
              "description": header, "env": environment(opts), "cases": [], "complete": False}
    json_path = os.path.join(args.out, "bench.json")
    cases = [c for op in opts.ops for c in OPS[op].cases(opts)]
    bar = _progress(sum(len(c.impls) for c in cases), not args.no_progress and sys.stderr.isatty())
    say = bar.write if bar is not None else print
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    failed = False
    try:
        for case in cases:
            if bar is not None:
                bar.set_description(f"{case.op} {case.direction}")

            def tick(name):
                if bar is not None:
                    bar.set_postfix_str(name)
                    bar.update(1)

            rec = run_case(case, plan, tick, interleave=interleave)
            record["cases"].append(rec)
            write_json(json_path, record)
            failed |= any(r["kind"] == "fastbert" and (r["status"] == "error" or (r["check"] and not r["check"]["ok"]))
                          for r in rec["results"])
            for line in table_lines([rec]):
                say(line)
        record["complete"] = True
    except (_Interrupted, KeyboardInterrupt) as exc:
        say(f"interrupted ({type(exc).__name__} {exc}): writing what was measured")
        failed = True
    finally:
        signal.signal(signal.SIGTERM, old)
        encoder.release()
        if bar is not None:
            bar.close()
        record["elapsed_s"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 3)
        write_json(json_path, record)
        with open(os.path.join(args.out, "bench.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(header + [f"measured {record['timestamp']} on {record['env'].get('device_name')}"]
                              + table_lines(record["cases"])) + "\n")
        plots, why_not = ([], "--plot none") if args.plot == "none" else write_plots(
            args.out, record["cases"], f"fastbert {fastbert.__version__} | {record['env'].get('device_name')} | "
            f"{str(opts.dtype).replace('torch.', '')} | {record['timestamp']}", combined=args.plot == "combined")
        print(f"\nwrote {json_path} and {os.path.join(args.out, 'bench.txt')} ({record['elapsed_s']:.1f} s)", flush=True)
        print(f"plots: {', '.join(plots)}" if plots else f"plots: none written ({why_not})", flush=True)
    return 1 if failed else 0
