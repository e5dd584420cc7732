"""The device check's race workload: one attention forward + backward per backend, small enough
to run under ``compute-sanitizer --tool racecheck`` (shared-memory hazards: a missing barrier, a
read of shared memory before its writer). Mask and dropout on, bf16, head_dim 64.

    compute-sanitizer --tool racecheck python benchmarks/racecheck_attention.py [--backend cuda,triton]
    python benchmarks/racecheck_attention.py --dry-run   # builds the inputs on the CPU, runs nothing

A backend that cannot run here (``fastbert._C`` not built, no GPU) is reported and skipped; the
exit status is 1 only when a backend that can run raised.
"""

from __future__ import annotations

import argparse
import sys

import torch


def workload(device: str, backend: str | None) -> None:
    from fastbert.ops import attention

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 96, 2, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    mask = torch.ones(2, 96, dtype=torch.bool, device=device)
    mask[1, 70:] = False
    if backend is None:  # dry run: shapes and arguments only
        return
    out = attention(q, k, v, attention_mask=mask, dropout_p=0.1, backend=backend)
    out.backward(torch.randn(out.shape, device=device, dtype=out.dtype, generator=g))
    torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda,triton", help="comma-separated backends (default cuda,triton)")
    p.add_argument("--dry-run", action="store_true", help="build the inputs on the CPU, launch nothing")
    a = p.parse_args(argv)
    if a.dry_run:
        workload("cpu", None)
        print("racecheck workload: dry run (inputs built on the CPU)")
        return 0
    from fastbert.backends import get_backend

    rc = 0
    for name in a.backend.split(","):
        why = get_backend(name).unavailable_reason("attention")
        if why is not None:
            print(f"racecheck workload: {name}: unavailable: {why}")
            continue
        try:
            workload("cuda", name)
        except Exception as exc:
            print(f"racecheck workload: {name}: FAILED: {type(exc).__name__}: {exc}")
            rc = 1
        else:
            print(f"racecheck workload: {name}: attention forward + backward ran")
    return rc


if __name__ == "__main__":
    sys.exit(main())
