"""Padded attention with a key mask on aten's CPU flash attention, grouped and read in place.

aten's CPU flash kernel runs a key length that is a multiple of 16 at full speed and any other
length 15-40% slower (fp32, 12 x 64 heads, 128 queries: 127 keys cost 1.4x 128 keys). So each
sequence runs on the keys up to its last valid one, rounded up to :data:`KEY_BLOCK`, and the
masked keys inside that span are excluded by an additive ``-inf`` mask (aten's mask costs about
nothing). That is exact only where those keys' K and V rows are finite (``x - inf = -inf``,
``exp(-inf) = 0``, ``0 * v = 0``), so the plan reads them first (per sequence, its masked rows inside the span, in place
under right padding, else gathered; free to ask on the CPU: V finite, K within a bound that keeps
scores finite) and gives up where one is not; the caller then runs each sequence on its exact valid keys. Consecutive
sequences with the same span run as one call (a small group whose sequences all hold the same
valid keys under right padding runs on exactly those: no mask, no check; :data:`EXACT_KEYS`), and neighbouring groups merge when the padded keys
cost less than another call; empty sequences (every key masked) run nothing and return zeros.
The mask-derived part of a plan (groups, additive masks, which rows to check) is remembered per
mask values (:func:`mask_plan`); the K/V check reads k and v on every call (:func:`masked_finite`).
:func:`forward` and :func:`backward` run a plan and lay its results out for both callers: the
eager path's fresh outputs (aten's own where one call covers the batch) and the custom op's
preallocated ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastbert.backends import workspace

_flash_cpu = torch._scaled_dot_product_flash_attention_for_cpu  # the C binding: no Python hop (an OpOverload has one)
_flash_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

KEY_BLOCK = 16  # key lengths aten's CPU flash kernel runs at full speed are multiples of this
# Cost model, in units of one sequence meeting one key (fp32, 128 queries, 12 x 64 heads, measured
# on the CPU): a sequence costs SEQ_COST + span, a call CALL_COST more, and assembling several
# groups' outputs into one tensor COPY_COST per sequence with a backward (the output and three
# gradients), FWD_COPY_COST without (one output: copying one sequence's [seqlen, heads, head_dim]
# costs ~40 us, 8 units of ~5 us). At BERT's shape and 50% fill (lengths 128 .. 1) both split the
# batch into 4 groups of 2 (22% less flash work; fewer masked rows inside the spans to check),
# measured 1 thread, CPU time, load ~5: fwd 1.27x SDPA with the same mask (one call: 0.91x),
# fwd+bwd 1.18x (one call: 0.97x; 1.10x with glibc's default malloc, whose fresh pages were what
# an earlier COPY_COST of 64 priced in).
SEQ_COST, CALL_COST, COPY_COST, FWD_COPY_COST = 48, 24, 24, 8
# A group whose sequences all hold the same valid key count under right padding may run on exactly
# those keys ``[0, count)``: no masked key inside the span, so no additive mask and no K/V check.
# It does so where the check (~15 us fixed + ~10 us per sequence: slices, aminmax, sum, stack, a
# host read) costs more than flash loses off a multiple of KEY_BLOCK, i.e. where the group is small:
# n sequences x span keys <= EXACT_KEYS. Measured 1 thread, CPU time, 12 x 64 heads, fp32, queries =
# keys, us rounded span + mask + check -> exact, fwd / bwd: 1x16 (12 valid) 31+15 -> 36 / 63 -> 60;
# 1x32 (20) 65+17 -> 65 / 142 -> 117; 2x32 (20) 175+54 -> 156 / 307 -> 318; 1x64 (50) 267+28 -> 259
# / 534 -> 459; above it exact loses: 2x64 (40) 334+31 -> 364 / 739 -> 946, 8x128 (60) 4096+104 ->
# 4606 / 8717 -> 8771.
EXACT_KEYS = 64


class Group(NamedTuple):
    """Sequences ``[start, stop)`` on keys ``[0, span)``; ``bias`` the additive ``[n, 1, 1, span]``
    mask (0 / -inf) or None when every key of the span is valid."""

    start: int
    stop: int
    span: int
    bias: Optional[torch.Tensor]


class Plan(NamedTuple):
    """The calls of one masked attention: ``groups`` and the ``empty`` sequences (every key
    masked). Masked keys inside a span get exact zero dK and dV from aten (``P = exp(-inf) = 0``;
    a non-finite q or dout gives NaN there, as it does in the reference)."""

    groups: list
    empty: list

    def one_call(self, batch: int) -> bool:
        """Whether one call covers every sequence (its out and lse are the outputs; its dK and dV
        too where its span is every key)."""
        return len(self.groups) == 1 and not self.empty and self.groups[0].stop - self.groups[0].start == batch


def _merge(spans: list, copy_cost: int = COPY_COST) -> list:
    """``[start, stop, span]`` groups of consecutive non-empty sequences of equal span, neighbours
    merged while the padded keys cost less than a call; one group for the whole batch when the
    groups save less than assembling their outputs costs (``copy_cost`` per sequence)."""
    groups: list = []
    for b, s in enumerate(spans):
        if not s:
            continue
        if groups and groups[-1][1] == b:
            p = groups[-1]
            top = max(p[2], s)
            if (p[1] - p[0]) * (top - p[2]) + (top - s) <= CALL_COST:
                p[1], p[2] = b + 1, top
                continue
        groups.append([b, b + 1, s])
    if len(groups) > 1 and all(spans):
        top = max(spans)
        split = sum((g[1] - g[0]) * (SEQ_COST + g[2]) for g in groups) + CALL_COST * (len(groups) - 1)
        if len(spans) * (SEQ_COST + top) <= split + copy_cost * len(spans):
            groups = [[0, len(spans), top]]
    return groups


class _Check(NamedTuple):
    """The masked K/V rows inside a plan's spans, from the mask alone: ``rows`` ``(b, start, stop)``
    per sequence under right padding (read in place), else ``bi``, ``ji`` their indices (gathered)."""

    rows: Optional[list]
    bi: Optional[torch.Tensor]
    ji: Optional[torch.Tensor]


# The last mask-derived plan per (copy cost, dtype): a BERT forward calls attention once per layer
# with the same mask, so all calls but the first find it here (the K/V check still runs on every
# call: it reads k and v). Keyed by the mask's values (a kept copy, compared with torch.equal: a
# few us for [batch, seqlen] bools), not by its storage or version: a freed mask's address can be
# reused, an inference tensor has no version, and a new tensor each call (``mask != 0``) still hits.
_LAST: dict = {}


def plan(attention_mask: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         copy_cost: int = COPY_COST) -> Optional[Plan]:
    """The grouped calls for bool ``attention_mask`` ``[batch, seqlen_k]`` over ``k``, ``v``
    ``[batch, seqlen_k, num_heads, head_dim]`` (CPU), or None when a masked key inside a span has a
    non-finite K or V entry (the caller runs the exact valid keys instead). ``copy_cost``: the cost
    of assembling one sequence's output from several groups (see :data:`COPY_COST`; a forward
    without backward copies one output, not three gradients: :data:`FWD_COPY_COST`)."""
    p, check = mask_plan(attention_mask, k.dtype, copy_cost)
    if check is not None and not masked_finite(k, v, check):
        return None
    return p


def mask_plan(attention_mask: torch.Tensor, dtype: torch.dtype, copy_cost: int = COPY_COST) -> tuple:
    """:func:`plan`'s part that depends on the mask alone, remembered (see ``_LAST``): ``(plan,
    check)``, ``check`` the masked rows inside its spans that :func:`masked_finite` must read
    before the plan may run (None: there are none). ``dtype``: the additive masks' (k's)."""
    key = (copy_cost, dtype)
    hit = _LAST.get(key)
    if hit is not None and hit[0].shape == attention_mask.shape and torch.equal(hit[0], attention_mask):
        return hit[1], hit[2]
    # Built outside inference mode: an entry made by an inference call (a mask, bias or index
    # tensor of inference mode) could not be saved for backward by a later training call's flash
    # node with the same mask values.
    with torch.inference_mode(False):
        p, check = _mask_plan(attention_mask, dtype, copy_cost)
        _LAST[key] = (attention_mask.clone(), p, check)
    return p, check


def _mask_plan(attention_mask, dtype, copy_cost):
    """``(plan, check)`` from the mask alone: the plan, and the masked rows inside its spans that
    :func:`masked_finite` must read (None: there are none)."""
    batch, seqlen_k = attention_mask.shape
    counts = attention_mask.sum(1).tolist()
    if all(n == seqlen_k for n in counts):
        return Plan([Group(0, batch, seqlen_k, None)], []), None
    ends = (attention_mask * torch.arange(1, seqlen_k + 1)).amax(1).tolist()  # last valid key + 1
    groups = _merge([min(seqlen_k, -(-e // KEY_BLOCK) * KEY_BLOCK) for e in ends], copy_cost)
    span_of = [0] * batch
    for start, stop, span in groups:
        span_of[start:stop] = [span] * (stop - start)
    out = []
    for start, stop, span in groups:
        bias = None
        n = counts[start]
        if (n < span and (stop - start) * span <= EXACT_KEYS
                and all(counts[b] == n == ends[b] for b in range(start, stop))):
            span = n  # exact valid keys: no masked key inside the span (EXACT_KEYS)
            span_of[start:stop] = [n] * (stop - start)
        if any(counts[b] < span for b in range(start, stop)):  # a masked key inside the span
            keep = attention_mask[start:stop, None, None, :span]
            bias = torch.full(keep.shape, float("-inf"), dtype=dtype).masked_fill_(keep, 0.0)
        out.append(Group(start, stop, span, bias))
    p = Plan(out, [b for b, e in enumerate(ends) if e == 0])
    if ends == counts:  # right padding: sequence b's masked rows inside its span are [end, span)
        rows = [(b, e, s) for b, (e, s) in enumerate(zip(ends, span_of)) if e < s]
        return p, (_Check(rows, None, None) if rows else None)
    top = max(span_of)
    inside = ~attention_mask[:, :top] & (torch.arange(top) < torch.tensor(span_of)[:, None])
    bi, ji = inside.nonzero(as_tuple=True)
    return p, (_Check(None, bi, ji) if bi.numel() else None)


# The largest |K| entry a masked key inside a span may hold: its score q . k * scale then stays
# finite (-inf after the mask, so exp gives 0) for every |q| entry below ~1e19 (head_dim 256;
# queries that large overflow on the valid keys too). Uninitialised padding can hold finite 1e30s,
# whose scores would overflow to inf and turn inf - inf into NaN: those plans give up.
MASKED_K_BOUND = 2.0 ** 60


def masked_finite(k, v, check: _Check) -> bool:
    """Whether the masked K and V rows inside the spans cannot leak: every V entry finite (a finite
    sum <=> every entry finite; NaN and +-inf propagate, an overflow only gives up) and every K
    entry within :data:`MASKED_K_BOUND` (its min and max; NaN fails the comparison). Under right
    padding those rows are read in place (one reduction per sequence and tensor); else gathered.
    One host read of all the reductions (``stack`` promotes K's extremes to the sums' fp32)."""
    if check.rows is not None:
        rows = [(k[b, e:s], v[b, e:s]) for b, e, s in check.rows]
    else:
        rows = [(k[check.bi, check.ji], v[check.bi, check.ji])]
    parts = []
    for kr, vr in rows:
        parts.extend(torch.aminmax(kr))
        parts.append(vr.sum(dtype=torch.float32))
    vals = torch.stack(parts).tolist()
    return (all(abs(x) <= MASKED_K_BOUND for i, x in enumerate(vals) if i % 3 != 2)
            and math.isfinite(sum(vals[2::3])))


def forward(qh, kh, vh, p: Plan, softmax_scale, out=None, lse=None, with_lse=True):
    """aten's CPU flash attention on the plan's groups over heads-first ``[batch, num_heads, seqlen,
    head_dim]`` views: ``(out, lse)``, out ``[B, Lq, H, d]`` and lse ``[B, H, Lq]`` (the logsumexp
    over the valid keys; empty sequences zeros and +inf), written into ``out`` / ``lse`` when given,
    else views of aten's own outputs where one call covers the batch, else the groups' outputs
    concatenated in batch order (one ``cat``, one parallel region, not one copy per group: each
    region is a barrier that a loaded machine's descheduled thread stretches); lse None when
    ``with_lse`` is False and there are several groups."""
    batch, heads, seqlen_q, head_dim = qh.shape
    res = [(g,) + tuple(_flash_cpu(qh[g.start:g.stop], kh[g.start:g.stop, :, :g.span],
                                   vh[g.start:g.stop, :, :g.span], 0.0, False, attn_mask=g.bias,
                                   scale=softmax_scale))
           for g in p.groups]
    if out is None and p.one_call(batch):
        o = res[0][1].transpose(1, 2)  # aten lays its output out as [B, Lq, H, d]
        return (o if o.is_contiguous() else o.contiguous()), res[0][2]
    if out is None:  # every sequence outside the groups is empty: zeros (and lse +inf) between them
        outs, lses, b = [], [], 0
        for g, o, l in res + [(Group(batch, batch, 0, None), None, None)]:
            if g.start > b:
                outs.append(qh.new_zeros((g.start - b, seqlen_q, heads, head_dim)))
                lses.append(qh.new_full((g.start - b, heads, seqlen_q), float("inf"), dtype=torch.float32))
            if o is not None:
                outs.append(o.transpose(1, 2))  # contiguous: aten lays o out as [n, Lq, H, d]
                lses.append(l)
            b = g.stop
        return torch.cat(outs), (torch.cat(lses) if with_lse else None)
    for g, o, l in res:
        out[g.start:g.stop] = o.transpose(1, 2)
        lse[g.start:g.stop] = l
    for b in p.empty:
        out[b] = 0.0
        lse[b] = float("inf")
    return out, lse


def backward(doh, qh, kh, vh, oh, lse, p: Plan, softmax_scale, grads=None):
    """Backward of :func:`forward` from its ``lse`` ``[B, H, Lq]`` (over the valid keys, whatever
    grouping the forward ran): ``(dq, dk, dv)`` ``[B, L, H, d]``, written into ``grads`` when given,
    else views of aten's gradients where one call covers every sequence and key, else fresh
    workspaces (each gradient its own where aten's covers it: dq of one call over the batch).
    Keys beyond a span and empty sequences get zeros."""
    res = [(g,) + tuple(_flash_cpu_bwd(doh[g.start:g.stop], qh[g.start:g.stop], kh[g.start:g.stop, :, :g.span],
                                       vh[g.start:g.stop, :, :g.span], oh[g.start:g.stop], lse[g.start:g.stop],
                                       0.0, False, attn_mask=g.bias, scale=softmax_scale))
           for g in p.groups]
    whole = grads is None and p.one_call(qh.shape[0])
    out = []
    for i, t in enumerate((qh, kh, vh)):
        if whole and (i == 0 or p.groups[0].span == t.shape[2]):
            gt = res[0][1 + i].transpose(1, 2)
            out.append(gt if gt.is_contiguous() else gt.contiguous())
            continue
        dst = grads[i] if grads is not None else workspace(t.transpose(1, 2).shape, t.dtype, t.device)
        for part in res:
            g, gt = part[0], part[1 + i]
            span = gt.shape[2]
            dst[g.start:g.stop, :span] = gt.transpose(1, 2)
            if span < dst.shape[1]:
                dst[g.start:g.stop, span:] = 0.0
        for b in p.empty:
            dst[b] = 0.0
        out.append(dst)
    return tuple(out)
