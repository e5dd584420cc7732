"""The torch backend's varlen path batches runs of consecutive equal-length sequences into one
SDPA call (``_sdpa_per_sequence``): forward and backward against the fp64 reference, with runs
across an empty sequence and split by length changes, and q/k/v strided views of one projection."""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_close_to_ref

from fastbert.backends.torch.attention import _equal_length_runs
from fastbert.ops import attention

# Runs (first row, count, length): an empty sequence has no rows, so the 4s around it form one run.
LENGTHS = [4, 4, 0, 4, 7, 7, 3, 3, 3, 1]


def test_equal_length_runs():
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    assert _equal_length_runs(cu) == [[0, 3, 4], [12, 2, 7], [26, 3, 3], [35, 1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_of_equal_lengths_match_reference(dtype, poison):
    heads, hd = 3, 16
    total = sum(LENGTHS)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(total, 3 * heads * hd, generator=g, dtype=torch.float64)
    dout = torch.randn(total, heads, hd, generator=g, dtype=torch.float64)

    def run(backend, cast):
        leaf = qkv.to(cast).requires_grad_()
        q, k, v = (leaf[:, i * heads * hd:(i + 1) * heads * hd].view(total, heads, hd) for i in range(3))  # strided
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend=backend)
        return [out, torch.autograd.grad(out, leaf, dout.to(cast))[0]]

    got, hi, lo = run("torch", dtype), run("reference", torch.float64), run("reference", dtype)
    for name, g_, h, l in zip(["out", "dqkv"], got, hi, lo):
        assert_close_to_ref(g_, h, l, name=name)
