"""The torch backend's eager attention paths that run aten's own calls (``attention_fwd_differentiable``):
with gradients, the unmasked or one-call masked flash attention recorded as aten's graph (no Python
autograd node); without gradients, grouped masked plans on the forward's cost model, their outputs
assembled. Against the fp64 reference with fresh random inputs and poisoned outputs, gradients of
q, k, v; garbage (NaN, inf, 1e4, 1e38) in masked K/V rows never reaching the output or the gradients
of valid positions; masked keys' dK / dV exact zeros; fully masked sequences zeros; the plan
remembered per mask values (a mask edited in place is planned again)."""

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
    "right padded": lambda: _lengths_mask([40, 31, 17, 1, 33]),
    "left padded": lambda: _lengths_mask([40, 30, 7]).flip(1),
    "holes": lambda: torch.rand(4, SEQLEN, generator=torch.Generator().manual_seed(3)) < 0.6,
    "spread": lambda: _lengths_mask([128, 120, 90, 70, 40, 33, 10, 1], 128),  # 4 groups, with or without backward
    "two spans": lambda: _lengths_mask([128, 128, 100, 60], 128),  # 2 groups without backward, 1 call with
    "empty seq": lambda: _lengths_mask([5, 0, 40, 16]),
    # Small groups of equal right-padded lengths: exact key spans (no mask, no K/V check)
    "tiny exact": lambda: _lengths_mask([12], 16),  # the overhead benchmark's "mask 0.75"
    "exact pair": lambda: _lengths_mask([0, 20, 20], 32),
}
GARBAGE = {"nan": float("nan"), "inf": float("inf"), "huge": 1e4, "overflow": 1e38}


def _inputs(batch, seed, seqlen=SEQLEN):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, HEADS, HD, generator=g, dtype=torch.float64) for _ in range(4)]


def _graph_names(t) -> set:
    """The names of every autograd node behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _poisoned_kv(mask, k, v, garbage):
    if garbage is None:
        return k, v
    bad = GARBAGE[garbage]
    k, v = (torch.where(mask[:, :, None, None], t, bad) for t in (k, v))
    if garbage == "overflow":  # in K alone (V's sum would overflow and give up by itself)
        v = torch.where(mask[:, :, None, None], v, 1.0)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("garbage", [None, *GARBAGE])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("grad", [True, False])
def test_eager_paths_match_reference_and_never_leak(mask_name, garbage, grad, dtype, poison):
    mask = MASKS[mask_name]()
    q, k, v, dy = _inputs(*mask.shape[:1], seed=len(mask_name) + 7 * len(garbage or ""), seqlen=mask.shape[1])
    kd, vd = _poisoned_kv(mask, k, v, garbage)

    def run(backend, cast, k, v):
        leaves = [t.to(cast).requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = attention(*leaves, attention_mask=mask, backend=backend)
        if not grad:
            assert out.grad_fn is None
            return [out]
        return [out] + list(torch.autograd.grad(out, leaves, dy.to(cast)))

    got = run("torch", dtype, kd, vd)
    clean = [torch.where(mask[:, :, None, None], t, 0.0) for t in (k, v)]  # the reference on clean rows
    hi, lo = run("reference", torch.float64, *clean), run("reference", dtype, *clean)
    for name, g_, h, l in zip(["out", "dq", "dk", "dv"], got, hi, lo):
        assert_close_to_ref(g_, h, l, name=name, floor_eps=8.0)
    for g_ in got[2:]:  # masked keys: exact zeros
        assert g_[~mask].eq(0).all()
    empty = ~mask.any(1)
    for g_ in got[:2]:  # fully masked sequences: zero output and dq, not NaN
        assert g_[empty].eq(0).all()


def test_gradients_record_aten_graph_only_for_one_call():
    """Unmasked and one-call masked calls record aten's flash node, no fastbert node; a plan with an
    empty sequence (several groups) keeps fastbert's node."""
    q, k, v, _ = (t.float().requires_grad_() for t in _inputs(5, seed=1))
    for mask in (None, _lengths_mask([40, 31, 17, 1, 33]), _lengths_mask([40, 30, 7, 9, 2]).flip(1)):
        names = _graph_names(attention(q, k, v, attention_mask=mask))
        assert "ScaledDotProductFlashAttentionForCpuBackward0" in names and "_EagerFunctionBackward" not in names
    names = _graph_names(attention(q, k, v, attention_mask=_lengths_mask([5, 0, 40, 16, 3])))
    assert "_EagerFunctionBackward" in names


def test_cost_models_split_spread_batches():
    """Spread lengths run as groups (less flash work on padded keys), with or without backward; a
    batch whose groups save less than assembling three gradients costs is one call with gradients
    (aten's graph) and two groups without. The check covers exactly the masked rows inside the spans."""
    mask = MASKS["spread"]()
    for cost in (_masked.COPY_COST, _masked.FWD_COPY_COST):
        p, check = _masked.mask_plan(mask, torch.float32, cost)
        assert len(p.groups) == 4 and sum((g.stop - g.start) * g.span for g in p.groups) < mask.numel()
        span_of = {b: g.span for g in p.groups for b in range(g.start, g.stop)}
        want = [(b, int(mask[b].sum()), span_of[b]) for b in range(mask.shape[0]) if mask[b].sum() < span_of[b]]
        assert check.rows == want
    mask = MASKS["two spans"]()
    assert _masked.mask_plan(mask, torch.float32, _masked.COPY_COST)[0].one_call(4)
    fwd, _ = _masked.mask_plan(mask, torch.float32, _masked.FWD_COPY_COST)
    assert [(g.start, g.stop, g.span) for g in fwd.groups] == [(0, 3, 128), (3, 4, 60)]  # 1 x 64 keys: exact
    q, k, v, _ = (t.float().requires_grad_() for t in _inputs(8, seed=3, seqlen=128))
    assert "_EagerFunctionBackward" not in _graph_names(attention(q[:4], k[:4], v[:4], attention_mask=mask))
    assert "_EagerFunctionBackward" in _graph_names(attention(q, k, v, attention_mask=MASKS["spread"]()))


def test_plan_is_remembered_by_mask_values_and_replanned_after_an_inplace_edit(poison):
    mask = _lengths_mask([40, 31, 17, 1, 33])
    q, k, v, _ = (t.float() for t in _inputs(5, seed=2))
    p1, _ = _masked.mask_plan(mask, torch.float32)
    assert _masked.mask_plan(mask.clone(), torch.float32)[0] is p1  # a new tensor, same values: a hit
    assert _masked.mask_plan(mask.to(torch.int8) != 0, torch.float32)[0] is p1
    with torch.no_grad():
        attention(q, k, v, attention_mask=mask)
        mask[0, 20:] = False  # in place, same storage: planned again
        mask[2, 10:] = False
        got = attention(q, k, v, attention_mask=mask)
        want = attention(q, k, v, attention_mask=mask.clone(), backend="reference")
    assert _masked.mask_plan(mask, torch.float32)[0] is not p1
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_one_call_masked_garbage_inside_span_is_bitwise_harmless():
    """Finite garbage in masked K/V rows inside the one call's span (the in-place path): output and
    gradients equal the run with zeros there, bit for bit (P = exp(-inf) = 0 exactly)."""
    mask = _lengths_mask([40, 31, 17, 1, 33])
    q, k, v, dy = (t.float() for t in _inputs(5, seed=4))
    outs = []
    for garbage in (None, "huge"):
        kd, vd = _poisoned_kv(mask, *(torch.where(mask[:, :, None, None], t, 0.0) for t in (k, v)), garbage)
        leaves = [t.clone().requires_grad_() for t in (q, kd, vd)]
        out = attention(*leaves, attention_mask=mask)
        assert "_EagerFunctionBackward" not in _graph_names(out)
        outs.append([out.detach()] + list(torch.autograd.grad(out, leaves, dy)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert torch.equal(a, b), f"{name}: masked rows influenced the result"


@pytest.mark.parametrize("mask_name", ["right padded", "left padded", "spread", "empty seq", None])
def test_aten_graph_survives_a_saved_tensor_hook_that_copies(mask_name):
    mask = None if mask_name is None else MASKS[mask_name]()
    shape = (5, SEQLEN) if mask is None else mask.shape
    q, k, v, dy = (t.float() for t in _inputs(shape[0], seed=5, seqlen=shape[1]))
    want = None
    for hook in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if hook:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                out = attention(*leaves, attention_mask=mask)
        else:
            out = attention(*leaves, attention_mask=mask)
        got = [out.detach()] + list(torch.autograd.grad(out, leaves, dy))
        if want is None:
            want = got
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aten_graph_sees_inplace_edits_of_k():
    """aten's node saves k's slice: an in-place edit of k after the forward fails autograd's version check."""
    mask = _lengths_mask([40, 31, 17, 1, 33])
    q, k, v, _ = (t.float().requires_grad_() for t in _inputs(5, seed=6))
    kk = k * 1.0
    out = attention(q, kk, v, attention_mask=mask)
    kk.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_an_inference_call_leaves_a_plan_a_training_call_can_save():
    """The remembered plan is built outside inference mode: an inference call that falls back
    (non-finite masked K) left inference tensors (mask copy, bias) in the slot the gradient path
    uses, and the next training call with the same mask values failed to save them for backward
    (found in review)."""
    mask = _lengths_mask([40, 31, 17])
    q, k, v, dout = (t.float() for t in _inputs(3, seed=6))
    _masked._LAST.clear()
    with torch.inference_mode():
        attention(q, torch.where(mask[:, :, None, None], k, float("nan")), v, attention_mask=mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, attention_mask=mask.clone())
    got = torch.autograd.grad(out, leaves, dout)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attention(*ref, attention_mask=mask, backend="reference"), ref, dout.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=2e-5)


def test_grad_mode_without_inputs_that_need_gradients_takes_the_forward_cost_model():
    """A model evaluated without torch.no_grad() (grad mode on, no input requiring a gradient) runs
    the eager forward without gradients, on the forward's cost model: ops says so (``backward=False``),
    the backend does not read grad mode (found in review)."""
    mask = MASKS["two spans"]()
    q, k, v, _ = (t.float() for t in _inputs(4, seed=7, seqlen=128))
    _masked._LAST.clear()
    with torch.enable_grad():
        got = attention(q, k, v, attention_mask=mask)
    assert set(_masked._LAST) == {(_masked.FWD_COPY_COST, torch.float32)}
    want = attention(q.double(), k.double(), v.double(), attention_mask=mask, backend="reference")
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lengths, seqlen, want", [
    ([12], 16, [(0, 1, 12)]), ([0, 20, 20], 32, [(1, 3, 20)]), ([50], 64, [(0, 1, 50)]),
    ([40, 40], 64, None),  # 2 x 48 keys > EXACT_KEYS: rounded span, mask and check
    ([20, 19], 32, None),  # unequal counts: rounded span
])
def test_small_equal_groups_run_on_exact_keys_without_mask_or_check(lengths, seqlen, want):
    """A small group (n x span <= EXACT_KEYS) whose sequences hold the same valid key count under
    right padding runs on exactly those keys: no additive mask, nothing for the K/V check to read
    (it costs more there than flash loses off a multiple of KEY_BLOCK). Larger or unequal groups
    keep the rounded span with its mask and check."""
    mask = _lengths_mask(lengths, seqlen)
    for cost in (_masked.COPY_COST, _masked.FWD_COPY_COST):
        p, check = _masked.mask_plan(mask, torch.float32, cost)
        if want is None:
            assert all(g.span % _masked.KEY_BLOCK == 0 and g.bias is not None for g in p.groups)
            assert check is not None
            continue
        assert [(g.start, g.stop, g.span) for g in p.groups] == want
        assert all(g.bias is None for g in p.groups) and check is None
        assert p.empty == [b for b, n in enumerate(lengths) if n == 0]


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_tiny_exact_span_at_bert_heads_never_leaks(garbage, poison):
    """The benchmark's tiny shape itself (1 x 16, 12 valid keys, 12 x 64 heads, fp32) on the exact
    span: output and gradients against fp64 with garbage in the masked K/V rows; masked keys' dK, dV
    exact zeros; aten's graph (one flash call, no fastbert node)."""
    mask = _lengths_mask([12], 16)
    g = torch.Generator().manual_seed(11)
    q, k, v, dy = (torch.randn(1, 16, 12, 64, generator=g, dtype=torch.float64) for _ in range(4))
    kd, vd = _poisoned_kv(mask, k, v, garbage)
    leaves = [t.float().requires_grad_() for t in (q, kd, vd)]
    out = attention(*leaves, attention_mask=mask)
    assert "_EagerFunctionBackward" not in _graph_names(out)
    got = [out] + list(torch.autograd.grad(out, leaves, dy.float()))
    with torch.no_grad():
        assert torch.equal(attention(*leaves, attention_mask=mask), out.detach())
    clean = [torch.where(mask[:, :, None, None], t, 0.0) for t in (k, v)]
    ref = [t.requires_grad_() for t in (q, *clean)]
    ro = attention(*ref, attention_mask=mask, backend="reference")
    hi = [ro] + list(torch.autograd.grad(ro, ref, dy))
    lo_in = [t.detach().float().requires_grad_() for t in ref]
    lo_out = attention(*lo_in, attention_mask=mask, backend="reference")
    lo = [lo_out] + list(torch.autograd.grad(lo_out, lo_in, dy.float()))
    for name, g_, h, l in zip(["out", "dq", "dk", "dv"], got, hi, lo):
        assert_close_to_ref(g_, h, l, name=name, floor_eps=8.0)
    for g_ in got[2:]:
        assert g_[~mask].eq(0).all()
