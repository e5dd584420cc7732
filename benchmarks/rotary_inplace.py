"""Rotary in place vs out of place in fastbert's ModernBERT attention, CPU, interleaved A/B rounds.

``ModernBertAttention.rotary_inplace`` picks ``fastbert.ops.rotary(..., inplace=True)`` (q, k rotated
in Wqkv's output buffer) or the out-of-place op (two new [tokens, heads, head_dim] tensors). This
times one ModernBERT-base attention layer (hidden 768, 12 heads, unpadded: 6 sequences, 1544
tokens) forward under no_grad and forward + backward, alternating the two modes round by round in
one process, and prints medians, min-max and the ratio (out-of-place time / in-place time: > 1
means in place pays), plus the load average.

    PYTHONPATH=. python benchmarks/rotary_inplace.py           # ~1 min idle (2 threads)
    PYTHONPATH=. python benchmarks/rotary_inplace.py --quick   # smoke: ~5 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape, 3 rounds (smoke test)")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    from transformers import ModernBertConfig

    from fastbert.nn.modernbert import ModernBertAttention, RotaryTables

    torch.manual_seed(0)
    cfg = ModernBertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=1152, num_hidden_layers=3)
    att = ModernBertAttention(cfg, 0)
    rot = RotaryTables(cfg).tables()
    lengths = [64, 32] if a.quick else [128, 384, 256, 512, 64, 200]
    rounds = 3 if a.quick else a.rounds
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(sum(lengths), 768)

    def forward():
        with torch.no_grad():
            att(x, rotary=rot, cu_seqlens=cu, max_seqlen=max(lengths))

    def forward_backward():
        out, _ = att(x.requires_grad_(), rotary=rot, cu_seqlens=cu, max_seqlen=max(lengths))
        out.sum().backward()

    results = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "tokens": sum(lengths)}
    old = ModernBertAttention.rotary_inplace
    try:
        for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
            fn()  # warm-up
            times = {True: [], False: []}
            for r in range(rounds):
                for mode in ((True, False) if r % 2 == 0 else (False, True)):
                    ModernBertAttention.rotary_inplace = mode
                    t0 = time.perf_counter()
                    fn()
                    times[mode].append(time.perf_counter() - t0)
            med = {m: statistics.median(t) for m, t in times.items()}
            results[name] = {"inplace_ms": med[True] * 1e3, "out_of_place_ms": med[False] * 1e3,
                             "inplace_range_ms": [min(times[True]) * 1e3, max(times[True]) * 1e3],
                             "out_of_place_range_ms": [min(times[False]) * 1e3, max(times[False]) * 1e3],
                             "ratio": med[False] / med[True]}
            print(f"{name:16s} inplace {med[True] * 1e3:8.2f} ms  out-of-place {med[False] * 1e3:8.2f} ms  "
                  f"ratio {med[False] / med[True]:.3f}x")
    finally:
        ModernBertAttention.rotary_inplace = old
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
