"""The torch backend's masked padded path (``fastbert.backends.torch._masked``): aten's CPU flash
attention on key spans rounded up to 16, masked keys inside a span excluded by an additive -inf
mask (read in place), split into groups where that pays, the exact per-sequence path where a
masked key is not finite. Forward and gradients against the fp64 reference, outputs poisoned,
masked K/V rows holding garbage, dK/dV exactly zero on masked keys."""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_close_to_ref

from fastbert.backends.torch import _masked
from fastbert.ops import attention

SEQLEN, HEADS, HD = 40, 3, 16


def _lengths_mask(lengths, seqlen=SEQLEN):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


MASKS = {
    "ragged": lambda: _lengths_mask([40, 39, 17, 1, 33]),  # one call, span 40
    "empty seq": lambda: _lengths_mask([5, 0, 40, 16]),  # groups around an empty sequence
    "short": lambda: _lengths_mask([3, 9, 14]),  # span 16 < seqlen: dK/dV beyond it are zeros
    "all ones": lambda: torch.ones(3, SEQLEN, dtype=torch.bool),
    "left padded": lambda: _lengths_mask([40, 30, 7]).flip(1),
    "holes": lambda: torch.rand(4, SEQLEN, generator=torch.Generator().manual_seed(3)) < 0.6,
}


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(batch, SEQLEN, HEADS, HD, generator=g, dtype=torch.float64) for _ in range(4))
    return q, k, v, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("garbage", [None, "nan", "inf", "huge", "overflow"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masked_plan_matches_reference(mask_name, garbage, dtype, poison):
    mask = MASKS[mask_name]()
    q, k, v, dy = _inputs(mask.shape[0], seed=len(mask_name))
    if garbage is not None:  # masked K/V rows: NaN / inf take the exact path, finite garbage the in-place one
        # ... except finite K so large its scores overflow to inf (uninitialised padding): exact path too
        bad = {"nan": float("nan"), "inf": float("inf"), "huge": 1e4, "overflow": 1e38}[garbage]
        k, v = (torch.where(mask[:, :, None, None], t, bad) for t in (k, v))
        if garbage == "overflow":  # in K alone (V's sum would overflow and give up by itself)
            v = torch.where(mask[:, :, None, None], v, 1.0)

    def run(backend, cast):
        leaves = [t.to(cast).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, attention_mask=mask, backend=backend)
        return [out] + list(torch.autograd.grad(out, leaves, dy.to(cast)))

    got = run("torch", dtype)
    clean = [torch.where(mask[:, :, None, None], t, 0.0) for t in (k, v)]  # the reference on clean rows
    k, v = clean
    hi, lo = run("reference", torch.float64), run("reference", dtype)
    for name, g_, h, l in zip(["out", "dq", "dk", "dv"], got, hi, lo):
        assert_close_to_ref(g_, h, l, name=name, floor_eps=8.0)  # as the unmasked flash path (test_thin_functional)
    for g_ in got[2:]:  # masked keys: exact zeros
        assert g_[~mask].eq(0).all()


def test_plan_groups_and_fallback():
    k = torch.randn(5, SEQLEN, HEADS, HD)
    v = torch.randn(5, SEQLEN, HEADS, HD)
    p = _masked.plan(_lengths_mask([40, 39, 17, 1, 33]), k, v)
    assert [(g.start, g.stop, g.span) for g in p.groups] == [(0, 5, 40)] and p.groups[0].bias is not None
    assert p.one_call(5) and not p.empty
    p = _masked.plan(torch.ones(5, SEQLEN, dtype=torch.bool), k, v)
    assert p.groups[0].bias is None and p.groups[0].span == SEQLEN
    p = _masked.plan(_lengths_mask([5, 0, 40, 16, 16]), k, v)
    assert p.empty == [1] and [(g.start, g.stop) for g in p.groups] == [(0, 1), (2, 5)]
    assert p.groups[1].span == 40 and p.groups[0].span == 5 and p.groups[0].bias is None  # exact (EXACT_KEYS)
    k[3, 20] = float("inf")  # a masked key inside sequence 3's span [0, 40)
    assert _masked.plan(_lengths_mask([5, 0, 40, 16, 16]), k, v) is None
    k[3, 20] = 0.0
    k[0, 10] = float("inf")  # masked, outside sequence 0's exact span [0, 5): not read
    v[0, 20] = float("nan")  # masked but outside every span that sequence 0 meets
    assert _masked.plan(_lengths_mask([5, 0, 40, 16, 16]), k, v) is not None
    k[4, 3] = float("nan")  # a valid key: the plan stands (the output is NaN there, as in the reference)
    assert _masked.plan(_lengths_mask([5, 0, 40, 16, 16]), k, v) is not None
    # Left padded: each sequence's span is the whole row, so its masked keys are inside it.
    left = _lengths_mask([5, 0, 40, 16, 16]).flip(1)
    k, v = torch.randn(5, SEQLEN, HEADS, HD), torch.randn(5, SEQLEN, HEADS, HD)
    p = _masked.plan(left, k, v)
    assert p is not None and p.empty == [1] and all(g.span == SEQLEN and g.bias is not None for g in p.groups)
    k[4, 3] = float("nan")  # masked (sequence 4 holds positions 24..39)
    assert _masked.plan(left, k, v) is None
    k[4, 3] = 0.0
    k[4, 30] = float("nan")  # a valid key: the plan stands
    assert _masked.plan(left, k, v) is not None


def test_plan_leaves_the_thread_count_alone(monkeypatch):
    k, v = torch.randn(2, SEQLEN, HEADS, HD), torch.randn(2, SEQLEN, HEADS, HD)
    before = torch.get_num_threads()

    def refuse(n):
        raise AssertionError(f"plan() called torch.set_num_threads({n})")
    monkeypatch.setattr(torch, "set_num_threads", refuse)
    assert _masked.plan(_lengths_mask([40, 9]), k, v) is not None
    assert _masked.plan(_lengths_mask([40, 9]).flip(1), k, v) is not None
    assert torch.get_num_threads() == before


def test_backward_plans_from_the_mask_and_autograd_guards_k():
    """Backward takes the forward's plan from the mask alone (its K/V check passed in forward:
    nothing rides on lse); an in-place edit of k after the forward fails autograd's version check
    instead of meeting a stale check (the grouped plan, fastbert's node)."""
    from fastbert.backends.torch.attention import attention_fwd_functional

    mask = _lengths_mask([40, 9])
    q, k, v = (torch.randn(2, SEQLEN, HEADS, HD) for _ in range(3))
    kw = dict(attn_bias=None, cu_seqlens=None, max_seqlen=0, dropout_p=0.0, seed=None, softmax_scale=0.25)
    _, lse = attention_fwd_functional(q, k, v, attention_mask=mask, **kw)
    assert lse.shape == (1, 2, HEADS, SEQLEN) and not hasattr(lse, "_fastbert_plan")
    grouped = _lengths_mask([40, 0, 9])  # an empty sequence: groups, fastbert's node
    assert len(_masked.mask_plan(grouped, torch.float32)[0].groups) == 2
    leaf = torch.randn(3, SEQLEN, HEADS, HD, requires_grad=True)
    kk = leaf * 1.0
    out = attention(leaf, kk, leaf, attention_mask=grouped)
    kk[2, 12] = float("nan")  # a masked key inside a span: the forward's check no longer holds
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()



@pytest.mark.parametrize("lengths, seqlen", [([12], 16), ([0, 20, 20], SEQLEN), ([5, 0, 40, 16], SEQLEN)])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e38])
def test_preallocated_path_on_exact_spans_never_leaks(lengths, seqlen, garbage):
    """The custom op's backend entry points (``attention_fwd`` / ``attention_bwd`` into NaN-filled
    outputs, ``lse`` allocated: ``_flash_padded`` and its backward) on plans with exact key spans
    (small groups of equal right-padded lengths: no mask, no check): garbage in masked K/V rows
    reaches neither the output nor any gradient; masked keys' dK, dV and fully masked sequences
    exact zeros; against the fp64 reference."""
    from fastbert.backends.torch import attention as backend

    mask = _lengths_mask(lengths, seqlen)
    assert any(g.bias is None and g.span < seqlen for g in _masked.mask_plan(mask, torch.float32)[0].groups)
    g = torch.Generator().manual_seed(len(lengths))
    q, k, v, dy = (torch.randn(len(lengths), seqlen, HEADS, HD, generator=g, dtype=torch.float64) for _ in range(4))
    keep = mask[:, :, None, None]
    qf, kf, vf = (t.float() for t in (q, torch.where(keep, k, garbage), torch.where(keep, v, garbage)))
    kw = dict(attention_mask=mask, attn_bias=None, cu_seqlens=None, max_seqlen=0, dropout_p=0.0, seed=None,
              softmax_scale=HD ** -0.5)
    out, lse = torch.full_like(qf, float("nan")), torch.full((2, len(lengths), HEADS, seqlen), float("nan"))
    backend.attention_fwd(qf, kf, vf, out, lse, **kw)
    grads = [torch.full_like(qf, float("nan")) for _ in range(3)]
    backend.attention_bwd(dy.float(), qf, kf, vf, out, lse, *grads, None, **kw)
    got = [out] + grads
    ref = [t.requires_grad_() for t in (q, torch.where(keep, k, 0.0), torch.where(keep, v, 0.0))]
    ro = attention(*ref, attention_mask=mask, backend="reference")
    want = [ro] + list(torch.autograd.grad(ro, ref, dy))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5, msg=name)
    for t in got[2:]:
        assert t[~mask].eq(0).all()
    for t in got[:2]:
        assert t[~mask.any(1)].eq(0).all()
