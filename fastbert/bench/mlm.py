"""Masked-LM training step: fastbert's ``BertForMaskedLM`` (unpadded, ``sparse_prediction`` on
and off) vs ``transformers.BertForMaskedLM`` (sdpa), the same random weights.

One step = forward in train mode (dropout 0.1), the MLM loss over 15% labelled real tokens,
backward, ``AdamW``. BERT-base shape, batch 8 x 128 at ~50% fill by default (``--size minilm``:
6 layers, hidden 384, 12 heads, intermediate 1536, the all-MiniLM-L6-v2 shape); wall clock,
implementations interleaved round by round (:func:`fastbert.bench.timing.measure_interleaved`),
median and interquartile range, ``uptime`` recorded. tokens/s counts real tokens. fastbert's
full-head model also runs with dropout off (``dropout_off``, interleaved with the rest):
``dropout_on_vs_off`` is the median of the per-round ratios of its step with dropout 0.1 over that
one (goal <= 1.10; ``dropout_on_vs_off_q25`` / ``_q75`` their quartiles). Before every timed or
warm-up step torch's RNG is reseeded and the CPU keep-mask memo emptied (:func:`same_draws`), so
every implementation draws the same dropout masks and generates them itself; the command line
sets glibc's malloc to keep freed memory (:func:`fastbert.bench.timing.steady_malloc`;
``--default-malloc`` leaves glibc's defaults), so only the first steps grow the heap (AdamW's
state among them) and the ``--warmup`` untimed steps per implementation (2 by default) absorb them.

    python -m fastbert.bench.mlm [--size base|minilm] [--rounds 7] [--threads 2] [--layers N]
                                 [--warmup 2] [--quick] [--default-malloc] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from fastbert.bench.core import padding_mask, variable_lengths
from fastbert.bench.timing import TimingPlan, malloc_note, measure_interleaved, ratio_stats, steady_malloc


SIZES = {  # BertConfig fields per --size (layers may be overridden by --layers)
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
}


def _models(layers: int | None, seed: int, size: str = "base"):
    import transformers

    import fastbert.models as fm

    shape = dict(SIZES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = transformers.BertConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **shape)
    torch.manual_seed(seed)
    hf = transformers.BertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
    sd = hf.state_dict()
    out = {"hf-sdpa": hf}
    for name, sparse, p in (("fastbert sparse_prediction", True, 0.1), ("fastbert", False, 0.1),
                            ("fastbert dropout 0", False, 0.0)):
        c = cfg.__class__(**{**cfg.to_dict(), "hidden_dropout_prob": p, "attention_probs_dropout_prob": p})
        m = fm.BertForMaskedLM(c, sparse_prediction=sparse)
        m.load_state_dict(sd)
        out[name] = m
    return out, cfg


def _batch(batch: int, seqlen: int, fill: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = variable_lengths(batch, seqlen, fill, seed)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = torch.randint(1, 30522, (batch, seqlen), generator=g) * mask
    pick = (torch.rand(batch, seqlen, generator=g) < 0.15) & mask.bool()
    labels = torch.where(pick, ids, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels), lengths


def same_draws(seed: int = 0):
    """A ``setup`` for :func:`~fastbert.bench.timing.measure_interleaved` that gives every step the
    same random numbers: torch's RNG reseeded (the same dropout seeds, hence masks) and the CPU
    keep-mask memo of :mod:`fastbert.backends._philox` emptied (else a step would find the masks
    an earlier step with the same seeds generated; a backward still finds its own forward's)."""
    from fastbert.backends import _philox

    def setup(_i=None):
        torch.manual_seed(seed)
        _philox.clear_mask_cache()
    return setup


def _step_fn(model, inputs):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()
    return step


def run(rounds: int = 7, threads: int = 2, layers: int | None = None, batch: int = 8, seqlen: int = 128,
        fill: float = 0.5, seed: int = 0, size: str = "base", warmup: int = 2, steady: bool = False) -> dict:
    """Time the step of every implementation after ``warmup`` untimed steps each (``steady``:
    :func:`steady_malloc` first, process-wide and for good, so only the command line asks for it;
    else the record says what is in force); returns a JSON-able dict (times in seconds)."""
    malloc = steady_malloc(steady)
    torch.set_num_threads(threads)
    inputs, lengths = _batch(batch, seqlen, fill, seed)
    models, cfg = _models(layers, seed, size)
    names = list(models)
    plan = TimingPlan(warmup=warmup, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock="wall")
    load_before = os.getloadavg()
    stats = measure_interleaved([_step_fn(models[n], inputs) for n in names], "cpu", plan, setup=same_draws(seed))
    load_after = os.getloadavg()
    on_vs_off = ratio_stats(stats[names.index("fastbert")], stats[names.index("fastbert dropout 0")])
    tokens = sum(lengths)
    rows = {n: dict(median_s=s.median, q25_s=s.quantile(0.25), q75_s=s.quantile(0.75), samples_s=s.samples,
                    tokens_per_s=tokens / s.median) for n, s in zip(names, stats)}
    base = rows["hf-sdpa"]["median_s"]
    for r in rows.values():
        r["speedup_vs_hf_sdpa"] = base / r["median_s"]
    dropout_off = rows.pop("fastbert dropout 0")  # a reference point, not a competitor
    import transformers

    return dict(benchmark="BertForMaskedLM training step", size=size, hidden=cfg.hidden_size, batch=batch,
                seqlen=seqlen, fill=tokens / (batch * seqlen), layers=cfg.num_hidden_layers,
                dropout_off=dropout_off, dropout_on_vs_off=on_vs_off.median,
                dropout_on_vs_off_q25=on_vs_off.quantile(0.25), dropout_on_vs_off_q75=on_vs_off.quantile(0.75),
                labelled=int((inputs["labels"] != -100).sum()), rounds=rounds, warmup=warmup, threads=threads,
                clock="wall", malloc=malloc, loadavg_before=load_before, loadavg_after=load_after,
                torch=torch.__version__, transformers=transformers.__version__, cpu=platform.processor(),
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=rows)


def main(argv=None) -> None:
    """Command line: run the benchmark, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--layers", type=int, default=None, help="override the size's layer count")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 layer, batch 2 x 32, 1 round, 1 warm-up")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--fill", type=float, default=0.5)
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's mmap / trim thresholds at their defaults (see the module docstring)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.layers, a.batch, a.seqlen, a.warmup = 1, 1, 2, 32, 1
    res = run(a.rounds, a.threads, a.layers, a.batch, a.seqlen, a.fill, size=a.size, warmup=a.warmup,
              steady=not a.default_malloc)
    print(f"{res['benchmark']}: {res['size']} (hidden {res['hidden']}) L{res['layers']} b{res['batch']} "
          f"s{res['seqlen']} fill {res['fill']:.2f}, "
          f"{res['labelled']} labelled, {res['threads']} threads, {res['warmup']} warm-up + {res['rounds']} rounds, load "
          f"{res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}, malloc: {malloc_note(res['malloc'])}")
    for name, r in res["rows"].items():
        print(f"  {name:28s} {r['median_s'] * 1e3:9.1f} ms  [{r['q25_s'] * 1e3:.1f}, {r['q75_s'] * 1e3:.1f}]  "
              f"{r['tokens_per_s']:8.0f} tok/s  {r['speedup_vs_hf_sdpa']:.2f}x hf-sdpa")
    print(f"  fastbert dropout 0.1 vs 0, per round: median {res['dropout_on_vs_off']:.2f}x "
          f"[{res['dropout_on_vs_off_q25']:.2f}, {res['dropout_on_vs_off_q75']:.2f}] step time (goal <= 1.10)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
