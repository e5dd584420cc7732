"""ModernBERT on the CPU: fastbert's ``ModernBertModel`` (unpadded) vs ``transformers.ModernBertModel``
(sdpa), the same random weights; and GeGLU (:func:`fastbert.ops.geglu`) vs the unfused torch sequence.

Encoder: ModernBERT-base's shape (hidden 768, 12 heads, intermediate 1152, 22 layers: global
every third, the others a 128-token window), an inference forward (eval, ``torch.inference_mode``)
on a padded batch of realistic variable lengths at ``--fill`` (default ~50%); checked first (the
last hidden state at real tokens agrees to 1e-3 in fp32). GeGLU: forward + backward of
``(batch * seqlen, 2 * 1152)`` fp32 rows, fastbert's op vs ``chunk`` / ``F.gelu`` / ``*`` under
autograd. Wall clock, implementations interleaved round by round
(:func:`fastbert.bench.timing.measure_interleaved`), median and interquartile range, ``uptime``
load before and after. tokens/s counts real tokens.

    python -m fastbert.bench.modernbert [--quick] [--rounds 7] [--threads 2] [--layers 22] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from fastbert.bench.core import padding_mask, variable_lengths
from fastbert.bench.timing import TimingPlan, measure_interleaved

BASE = dict(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_attention_heads=12,
            local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=8192)


def _models(layers: int, seed: int):
    import transformers

    import fastbert.models as fm

    cfg = transformers.ModernBertConfig(num_hidden_layers=layers, **BASE)
    torch.manual_seed(seed)
    hf = transformers.ModernBertModel._from_config(cfg, attn_implementation="sdpa").eval()
    fb = fm.ModernBertModel(cfg).eval()
    fb.load_state_dict(hf.state_dict())
    return {"hf-sdpa": hf, "fastbert": fb}


def _batch(batch: int, seqlen: int, fill: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = variable_lengths(batch, seqlen, fill, seed)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = torch.randint(3, BASE["vocab_size"], (batch, seqlen), generator=g) * mask
    return dict(input_ids=ids, attention_mask=mask), lengths


def _rows(names, stats, units: float) -> dict:
    rows = {n: dict(median_s=s.median, q25_s=s.quantile(0.25), q75_s=s.quantile(0.75), samples_s=s.samples,
                    per_s=units / s.median) for n, s in zip(names, stats)}
    base = rows[names[0]]["median_s"]
    for r in rows.values():
        r["speedup"] = base / r["median_s"]
    return rows


def encoder(rounds: int, layers: int, batch: int, seqlen: int, fill: float, seed: int = 0) -> dict:
    """Time the forward of both models; returns a JSON-able dict (times in seconds)."""
    inputs, lengths = _batch(batch, seqlen, fill, seed)
    models = _models(layers, seed)
    real = inputs["attention_mask"].bool()
    with torch.inference_mode():
        outs = {n: m(**inputs).last_hidden_state for n, m in models.items()}
    err = (outs["fastbert"] - outs["hf-sdpa"])[real].abs().max().item()
    if not err <= 1e-3:
        raise AssertionError(f"fastbert vs transformers ModernBERT: max abs error {err:.3e} > 1e-3 at real tokens")
    names = list(models)

    def fwd(m):
        def run():
            with torch.inference_mode():
                m(**inputs)
        return run

    plan = TimingPlan(warmup=1, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock="wall")
    stats = measure_interleaved([fwd(models[n]) for n in names], "cpu", plan)
    tokens = sum(lengths)
    return dict(benchmark="ModernBertModel forward", layers=layers, batch=batch, seqlen=seqlen,
                fill=tokens / (batch * seqlen), check_max_abs_err=err, rows=_rows(names, stats, tokens),
                unit="tokens/s")


def geglu(rounds: int, rows: int, seed: int = 0) -> dict:
    """GeGLU forward + backward: fastbert's op vs the unfused torch sequence."""
    from fastbert.ops import geglu as fused

    width = 2 * BASE["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g).requires_grad_()
    dy = torch.randn(rows, width // 2, generator=g)

    def unfused(x):
        a, gate = x.chunk(2, dim=-1)
        return F.gelu(a) * gate

    def step(fn):
        def run():
            x.grad = None
            fn(x).backward(dy)
        return run

    torch.testing.assert_close(fused(x), unfused(x))
    names = ["torch unfused", "fastbert geglu"]
    plan = TimingPlan(warmup=2, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock="wall")
    stats = measure_interleaved([step(unfused), step(fused)], "cpu", plan)
    return dict(benchmark="GeGLU forward+backward fp32", rows=rows, width=width,
                results=_rows(names, stats, rows), unit="rows/s")


def run(quick: bool = False, rounds: int = 7, threads: int = 2, layers: int = 22, batch: int = 8,
        seqlen: int = 512, fill: float = 0.5, seed: int = 0) -> dict:
    """Both benchmarks (``quick``: 3 layers, batch 4 x 256, 3 rounds: a smoke run of every line)."""
    import transformers

    if quick:
        rounds, layers, batch, seqlen = 3, 3, 4, 256
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    enc = encoder(rounds, layers, batch, seqlen, fill, seed)
    glu = geglu(rounds, batch * seqlen, seed)
    return dict(quick=quick, rounds=rounds, threads=threads, clock="wall", loadavg_before=load_before,
                loadavg_after=os.getloadavg(), torch=torch.__version__, transformers=transformers.__version__,
                cpu=platform.processor(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                encoder=enc, geglu=glu)


def main(argv=None) -> None:
    """Command line: run the benchmarks, print the tables, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 layers, batch 4 x 256, 3 rounds")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--fill", type=float, default=0.5)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    res = run(a.quick, a.rounds, a.threads, a.layers, a.batch, a.seqlen, a.fill)
    enc, glu = res["encoder"], res["geglu"]
    print(f"{enc['benchmark']}: L{enc['layers']} b{enc['batch']} s{enc['seqlen']} fill {enc['fill']:.2f} "
          f"(check: max abs err {enc['check_max_abs_err']:.1e}), {res['threads']} threads, {res['rounds']} rounds, "
          f"load {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}")
    for name, r in enc["rows"].items():
        print(f"  {name:16s} {r['median_s'] * 1e3:9.1f} ms  [{r['q25_s'] * 1e3:.1f}, {r['q75_s'] * 1e3:.1f}]  "
              f"{r['per_s']:8.0f} tok/s  {r['speedup']:.2f}x hf-sdpa")
    print(f"{glu['benchmark']}: {glu['rows']} x {glu['width']}")
    for name, r in glu["results"].items():
        print(f"  {name:16s} {r['median_s'] * 1e3:9.2f} ms  [{r['q25_s'] * 1e3:.2f}, {r['q75_s'] * 1e3:.2f}]  "
              f"{r['speedup']:.2f}x unfused")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
