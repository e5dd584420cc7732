"""The torch backend's varlen attention with dropout (``backends/torch/_attention_dropout.py``):
runs of equal-length sequences against the fp64 reference with the same keep masks, and the
forward's softmax kept for the backward (``SAVED``): a backward that finds it gives the same
gradients as one that recomputes, and never finds another call's."""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_close_to_ref

from fastbert.backends.torch import _attention_dropout
from fastbert.ops import attention

LENGTHS = [4, 4, 0, 4, 7, 7, 3, 3, 3, 1, 33]  # runs across an empty sequence, split by length changes
HEADS, HD = 3, 16


def _inputs(seed):
    total = sum(LENGTHS)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, 3 * HEADS * HD, generator=g, dtype=torch.float64)
    dout = torch.randn(total, HEADS, HD, generator=g, dtype=torch.float64)
    return qkv, dout, cu


def _run(qkv, dout, cu, backend, dtype, p=0.2, grad_seed=None):
    """out and d(qkv) of attention on strided q/k/v views of one projection (the dropout seed drawn
    after torch.manual_seed(7), the same for every backend)."""
    total = qkv.shape[0]
    leaf = qkv.to(dtype).requires_grad_()
    q, k, v = (leaf[:, i * HEADS * HD:(i + 1) * HEADS * HD].view(total, HEADS, HD) for i in range(3))
    torch.manual_seed(7)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), dropout_p=p, backend=backend)
    return [out, torch.autograd.grad(out, leaf, dout.to(dtype))[0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_varlen_dropout_runs_match_reference(dtype, poison):
    qkv, dout, cu = _inputs(3)
    got = _run(qkv, dout, cu, "torch", dtype)
    hi, lo = _run(qkv, dout, cu, "reference", torch.float64), _run(qkv, dout, cu, "reference", dtype)
    for name, g, h, l in zip(["out", "dqkv"], got, hi, lo):
        assert_close_to_ref(g, h, l, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_softmax_gives_the_recomputed_gradients(dtype, monkeypatch):
    qkv, dout, cu = _inputs(4)
    saved = _attention_dropout.SAVED
    saved.clear()
    with_saved = _run(qkv, dout, cu, "torch", dtype)
    assert not saved._entries, "the backward takes its entry out"
    monkeypatch.setattr(saved, "budget_bytes", 0)  # nothing saved: the backward recomputes P
    recomputed = _run(qkv, dout, cu, "torch", dtype)
    for a, b in zip(with_saved, recomputed):
        assert torch.equal(a, b)


def test_saved_softmax_never_serves_another_call():
    """Two forwards with the same dropout seed on different inputs: each backward gets its own
    gradients (the entry is keyed by the inputs, not the seed alone); a forward without gradients
    saves nothing."""
    saved = _attention_dropout.SAVED
    saved.clear()
    (qkv1, dout, cu), (qkv2, _, _) = _inputs(5), _inputs(6)
    total = qkv1.shape[0]
    expected = _run(qkv1, dout, cu, "torch", torch.float32)[1]
    outs = []
    for qkv in (qkv1, qkv2):
        leaf = qkv.float().requires_grad_()
        q, k, v = (leaf[:, i * HEADS * HD:(i + 1) * HEADS * HD].view(total, HEADS, HD) for i in range(3))
        torch.manual_seed(7)  # the same seed for both calls
        outs.append((leaf, attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), dropout_p=0.2,
                                     backend="torch")))
    assert len(saved._entries) == 2
    leaf, out = outs[0]
    assert torch.equal(torch.autograd.grad(out, leaf, dout.float())[0], expected)
    with torch.no_grad():
        q = qkv1.float()[:, :HEADS * HD].reshape(total, HEADS, HD)
        attention(q, q, q, cu_seqlens=cu, max_seqlen=max(LENGTHS), dropout_p=0.2, backend="torch")
    assert len(saved._entries) == 1
    saved.clear()
