"""DistributedDataParallel with fastbert: 2 CPU processes (gloo, one thread each), two steps.

Every parameter must get a gradient (DDP errors at the next step otherwise), and the averaged
gradients must equal a single-process run on the same global batch. Each rank gets the same number
of examples and of labelled (MLM) tokens, so the mean of the per-rank mean losses is the global
mean loss. Covered: fastbert's BertForPreTraining (unpadded) and a patched transformers
BertForPreTraining.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

WORLD_SIZE = 2
STEPS = 2
BATCH_PER_RANK = 2
SEQLEN = 16
LABELLED_PER_SEQUENCE = 3
VOCAB = 96
MODELS = ("fastbert", "transformers")
LR = 0.5


def _config_kwargs():
    return dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "fastbert":
        from fastbert.models import BertConfig, BertForPreTraining

        return BertForPreTraining(BertConfig(**_config_kwargs()))
    import transformers

    from fastbert.integrations.transformers import patch

    return patch(transformers.BertForPreTraining(transformers.BertConfig(**_config_kwargs())))


def _global_batches():
    """``STEPS`` global batches of ``WORLD_SIZE * BATCH_PER_RANK`` padded sequences; every
    sequence has exactly ``LABELLED_PER_SEQUENCE`` MLM labels and both token types."""
    g = torch.Generator().manual_seed(1)
    out = []
    n = WORLD_SIZE * BATCH_PER_RANK
    for _ in range(STEPS):
        lengths = torch.randint(8, SEQLEN + 1, (n,), generator=g)
        mask = (torch.arange(SEQLEN)[None] < lengths[:, None]).long()
        input_ids = torch.randint(5, VOCAB, (n, SEQLEN), generator=g) * mask
        token_type_ids = (torch.arange(SEQLEN)[None] >= (lengths[:, None] // 2)).long() * mask
        labels = torch.full((n, SEQLEN), -100)
        for i in range(n):
            pos = torch.randperm(int(lengths[i]) - 2, generator=g)[:LABELLED_PER_SEQUENCE] + 1
            labels[i, pos] = torch.randint(5, VOCAB, (LABELLED_PER_SEQUENCE,), generator=g)
        nsp = torch.randint(0, 2, (n,), generator=g)
        out.append({"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids,
                    "labels": labels, "next_sentence_label": nsp})
    return out


def _run(model, batches, rank=None):
    """Two SGD steps; returns the gradients of each step (before its optimizer step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for batch in batches:
        if rank is not None:
            sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
            batch = {k: v[sl] for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        module = model.module if hasattr(model, "module") else model
        grads.append({n: (None if p.grad is None else p.grad.detach().clone())
                      for n, p in module.named_parameters()})
        optimizer.step()
    return grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = {}
        for kind in MODELS:
            ddp = torch.nn.parallel.DistributedDataParallel(_build(kind))
            result[kind] = _run(ddp, _global_batches(), rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned processes
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for kind in MODELS:
        want = _run(_build(kind), _global_batches())
        for step in range(STEPS):
            for name, ref in want[step].items():
                assert ref is not None, f"{kind} single process: {name} got no gradient"
                for r in range(WORLD_SIZE):
                    got = ranks[r][kind][step][name]
                    assert got is not None, f"{kind} rank {r} step {step}: {name} got no gradient"
                    assert got.abs().sum() > 0, f"{kind} rank {r} step {step}: {name} has a zero gradient"
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{kind} rank {r} step {step} {name}: {m}")
