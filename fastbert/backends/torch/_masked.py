"""Padded attention with a key mask on aten's CPU flash attention, grouped and read in place.

aten's CPU flash kernel runs a key length that is a multiple of 16 at full speed and any other
length 15-40% slower (fp32, 12 x 64 heads, 128 queries: 127 keys cost 1.4x 128 keys). So each
sequence runs on the keys up to its last valid one, rounded up to :data:`KEY_BLOCK`, and the
masked keys inside that span are excluded by an additive ``-inf`` mask (aten's mask costs about
nothing). That is exact only where those keys' K and V rows are finite (``x - inf = -inf``,
``exp(-inf) = 0``, ``0 * v = 0``), so the plan reads them first (a gather of the masked rows inside
the spans, free to ask on the CPU) and gives up where one is not; the caller then runs each
sequence on its exact valid keys. Consecutive sequences with the same span run as one call, and
neighbouring groups merge when the padded keys cost less than another call; empty sequences
(every key masked) run nothing and return zeros.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

KEY_BLOCK = 16  # key lengths aten's CPU flash kernel runs at full speed are multiples of this
# Cost model, in units of one sequence meeting one key (fp32, 128 queries, 12 x 64 heads, measured
# on the CPU): a sequence costs SEQ_COST + span, a call CALL_COST more, and assembling several
# groups' outputs into one tensor COPY_COST per sequence (fresh pages: the backward's three
# gradients cost about 30% of the flash backward), so one call over the batch is the usual plan.
SEQ_COST, CALL_COST, COPY_COST = 48, 24, 64
# aten reduces up to this many elements on the calling thread (its grain size); a larger sum opens
# a parallel region, which costs up to a scheduler period (milliseconds) on a loaded machine, so
# the masked rows are summed in chunks of at most this size
_SERIAL = 32768


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


def _merge(spans: list) -> list:
    """``[start, stop, span]`` groups of consecutive non-empty sequences of equal span, neighbours
    merged while the padded keys cost less than a call; one group for the whole batch when the
    groups save less than assembling their outputs costs."""
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
        if len(spans) * (SEQ_COST + top) <= split + COPY_COST * len(spans):
            groups = [[0, len(spans), top]]
    return groups


def plan(attention_mask: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[Plan]:
    """The grouped calls for bool ``attention_mask`` ``[batch, seqlen_k]`` over ``k``, ``v``
    ``[batch, seqlen_k, num_heads, head_dim]`` (CPU), or None when a masked key inside a span has a
    non-finite K or V entry (the caller runs the exact valid keys instead)."""
    batch, seqlen_k = attention_mask.shape
    if bool(attention_mask.all()):
        return Plan([Group(0, batch, seqlen_k, None)], [])
    ends = (attention_mask * torch.arange(1, seqlen_k + 1)).amax(1).tolist()  # last valid key + 1
    spans = [min(seqlen_k, -(-e // KEY_BLOCK) * KEY_BLOCK) for e in ends]
    groups = _merge(spans)
    span_of = [0] * batch
    for start, stop, span in groups:
        span_of[start:stop] = [span] * (stop - start)
    if ends == attention_mask.sum(1).tolist():
        # right padding (each sequence's valid keys a prefix): the masked keys inside a span are
        # its rows [end, span), read in place (a gather of half the rows at 50% fill costs fresh pages)
        rows = [(b, ends[b], span_of[b]) for b in range(batch) if ends[b] < span_of[b]]
        step = max(1, _SERIAL // k[0, 0].numel())  # rows per serial sum
        parts = [t[b, j:min(j + step, hi)].sum(dtype=torch.float32)
                 for b, lo, hi in rows for j in range(lo, hi, step) for t in (k, v)]
        masked = {b for b, _, _ in rows}
    else:
        top = max(span_of)
        inside = ~attention_mask[:, :top] & (torch.arange(top) < torch.tensor(span_of)[:, None])
        bi, ji = inside.nonzero(as_tuple=True)
        parts = [t[bi, ji].sum(dtype=torch.float32) for t in (k, v)] if bi.numel() else []
        masked = set(bi.tolist())
    # finite sum <=> every entry finite (NaN and +-inf propagate; an overflow only gives up)
    if parts and not math.isfinite(float(torch.stack(parts).sum())):
        return None
    out = []
    for start, stop, span in groups:
        bias = None
        if any(b in masked for b in range(start, stop)):
            keep = attention_mask[start:stop, None, None, :span]
            bias = torch.zeros(keep.shape, dtype=k.dtype).masked_fill_(~keep, float("-inf"))
        out.append(Group(start, stop, span, bias))
    return Plan(out, [b for b, e in enumerate(ends) if e == 0])


def forward(qh, kh, vh, p: Plan, softmax_scale):
    """``[(group, out, lse)]``: aten's CPU flash attention per group on heads-first
    ``[batch, num_heads, seqlen, head_dim]`` views (out heads-first ``[n, H, Lq, d]``, laid out
    ``[n, Lq, H, d]`` in memory; lse ``[n, H, Lq]``, the logsumexp over the valid keys)."""
    res = []
    for g in p.groups:
        rows = slice(g.start, g.stop)
        o, lse = _flash_cpu(qh[rows], kh[rows, :, :g.span], vh[rows, :, :g.span], 0.0, False,
                            attn_mask=g.bias, scale=softmax_scale)
        res.append((g, o, lse))
    return res


def backward(doh, qh, kh, vh, oh, lse, p: Plan, softmax_scale):
    """``[(group, dq, dk, dv)]`` heads-first, dk / dv over the group's span; ``lse`` ``[B, H, Lq]``
    the forward's logsumexp (over the valid keys, whatever grouping the forward ran)."""
    res = []
    for g in p.groups:
        rows = slice(g.start, g.stop)
        grads = _flash_cpu_bwd(doh[rows], qh[rows], kh[rows, :, :g.span], vh[rows, :, :g.span], oh[rows],
                               lse[rows], 0.0, False, attn_mask=g.bias, scale=softmax_scale)
        res.append((g,) + tuple(grads))
    return res


def scatter(parts, p: Plan, dst, fill=0.0):
    """Write each ``(group, result)`` into ``dst``: heads-first ``[n, H, span, d]`` results into
    ``[B, L, H, d]`` (zeros beyond the span), lse ``[n, H, Lq]`` into ``[B, H, Lq]``; ``fill`` for
    the empty sequences."""
    for g, t in parts:
        rows = slice(g.start, g.stop)
        if t.dim() == 3:  # lse [n, H, Lq]
            dst[rows] = t
            continue
        span = t.shape[2]
        dst[rows, :span] = t.transpose(1, 2)
        if span < dst.shape[1]:
            dst[rows, span:] = 0.0
    for b in p.empty:
        dst[b] = fill
    return dst
