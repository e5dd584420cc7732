"""Attention with dropout on the CPU for one block of sequences without key masks (a run of
equal-length varlen sequences): the contract's composite math, streamlined.

Forward (Vaswani et al. 2017 eq. 1 with inverted dropout; Z = keep mask * dropout_scale(p)):
  S = scale * Q K^T,   P = softmax(S),   O = (P * Z) V.
Backward, from P (Z as above, D = rowsum(dO * O)):
  dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - D),   dQ = scale * dS K,   dK = scale * dS^T Q.

As :func:`fastbert.backends._composite.attention_math` computes it — scores, softmax and every
product in the accumulation dtype (fp32; fp64 for fp64 inputs), ``P * Z`` and dS rounded to q's
dtype before their products — but with fewer passes over the ``[heads, L, L]`` planes, which are
what the step spends its time on: no key mask (none is needed within a run), no logsumexp (the
varlen path writes no statistics), the scale folded into the matrix products' ``alpha`` where the
dtype is the accumulation dtype (fp32/fp64: no rounding in between), ``D`` from O rather than
from the planes, and the keep mask multiplied in as floats. The forward also keeps P for the
backward (:class:`SavedProbs`) so that the backward need not recompute ``Q K^T`` and the softmax.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fastbert.backends._composite_common import acc_dtype, round_to


def _heads(t, acc):
    """``[n, L, H, d]`` (any strides, contiguous last dim) -> contiguous ``[n * H, L, d]`` in ``acc``."""
    n, length, h, d = t.shape
    return t.transpose(1, 2).to(acc).reshape(n * h, length, d)


def _store(dst, g):
    """Write ``g`` ``[n * H, L, d]`` into the ``[n, L, H, d]`` view ``dst``."""
    n, length, h, d = dst.shape
    dst.copy_(g.view(n, h, length, d).transpose(1, 2))


def _keep_float(keep, acc):
    """The bool keep mask ``[n, H, L, L]`` as 0/1 in ``acc``, ``[n * H, L, L]`` (a float mask
    multiplies at the speed of float data; bool * float goes through a converting loop, ~3x slower)."""
    n, h, lq, lk = keep.shape
    return keep.reshape(n * h, lq, lk).to(acc)


def dropout_attention_fwd(q, k, v, out, keep, *, dropout_scale: float, softmax_scale: float):
    """``out`` ``[n, L, H, d]`` for q/k/v ``[n, L, H, d]`` and ``keep`` bool ``[n, H, L, L]``;
    returns ``(P, Z01)``: the softmax fp32 (fp64) ``[n * H, L, L]`` and the 0/1 keep mask in that
    dtype, for :func:`dropout_attention_bwd`."""
    acc = acc_dtype(q.dtype)
    exact = q.dtype == acc  # products in q's dtype: the scales fold into alpha without a rounding between
    qh, kh, vh = (_heads(t, acc) for t in (q, k, v))
    scores = torch.baddbmm(qh.new_empty(()), qh, kh.transpose(1, 2), beta=0.0, alpha=softmax_scale)  # [nH, L, L]
    probs = torch.softmax(scores, dim=-1)
    z01 = _keep_float(keep, acc)
    dropped = probs * z01
    if exact:
        o = torch.baddbmm(vh.new_empty(()), dropped, vh, beta=0.0, alpha=dropout_scale)
    else:
        o = round_to(dropped.mul_(dropout_scale), q.dtype) @ vh
    _store(out, o)
    return probs, z01


def dropout_attention_bwd(dout, q, k, v, out, dq, dk, dv, keep, *, dropout_scale: float, softmax_scale: float,
                          saved=None):
    """Writes dq, dk, dv ``[n, L, H, d]``; ``saved``: :func:`dropout_attention_fwd`'s ``(P, Z01)``
    for these inputs, or None to recompute them."""
    acc = acc_dtype(q.dtype)
    exact = q.dtype == acc
    qh, kh, vh, doh = (_heads(t, acc) for t in (q, k, v, dout))
    if saved is None:
        scores = torch.baddbmm(qh.new_empty(()), qh, kh.transpose(1, 2), beta=0.0, alpha=softmax_scale)
        probs, z01 = torch.softmax(scores, dim=-1), _keep_float(keep, acc)
    else:
        probs, z01 = saved
    # D = rowsum(dO * O) = rowsum(dP * P), from the [nH, L, d] tensors rather than the [nH, L, L] planes
    delta = (doh * _heads(out, acc)).sum(-1, keepdim=True)  # [nH, L, 1]
    dp = torch.bmm(doh, vh.transpose(1, 2)).mul_(z01)  # dO V^T * keep: [nH, L, L]
    if exact:
        dv_ = torch.baddbmm(vh.new_empty(()), (probs * z01).transpose(1, 2), doh, beta=0.0, alpha=dropout_scale)
        # dS / dropout_scale = P * (dO V^T * keep - D / dropout_scale); dropout_scale rides in alpha
        ds = dp.sub_(delta.div_(dropout_scale)).mul_(probs)
        alpha = softmax_scale * dropout_scale
    else:
        dv_ = round_to((probs * z01).mul_(dropout_scale), q.dtype).transpose(1, 2) @ doh
        ds = round_to(dp.mul_(dropout_scale).sub_(delta).mul_(probs), q.dtype)
        alpha = softmax_scale
    dq_ = torch.baddbmm(qh.new_empty(()), ds, kh, beta=0.0, alpha=alpha)
    dk_ = torch.baddbmm(kh.new_empty(()), ds.transpose(1, 2), qh, beta=0.0, alpha=alpha)
    for dst, g in ((dq, dq_), (dk, dk_), (dv, dv_)):
        _store(dst, g)


class SavedProbs:
    """The softmax of the last dropout forwards, for their backwards (P costs a ``Q K^T`` and a
    softmax to recompute; ``[heads, L, L]`` fp32 per sequence is ~2 MB per BERT-base layer at
    8 x 128 and 50% fill). An entry is keyed by the call's inputs — q, k, v by address, shape,
    strides, dtype and version counter (the entry holds them, so no other tensor can take their
    memory while it lives), the seed, p, the scale and the layout — so a backward finds exactly
    its forward's P or nothing (then recomputes). Taken out when found; oldest first out beyond
    :attr:`budget_bytes`. Only eager CPU calls whose q, k or v require a gradient are saved."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _key(q, k, v, seed, extra):
        tensors = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t._version) for t in (q, k, v))
        return tensors + (tuple(seed.tolist()),) + tuple(extra)

    @staticmethod
    def wanted(q, k, v, seed):
        if not any(t.requires_grad for t in (q, k, v)) or seed.device.type != "cpu":
            return False
        plain = all(type(t) is torch.Tensor for t in (q, k, v, seed))
        return plain and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()

    def put(self, q, k, v, seed, extra, value):
        """Save ``value`` (a list of tensors) for the call; nothing beyond the budget."""
        size = sum(t.untyped_storage().nbytes() for t in value)
        if size > self.budget_bytes:
            return
        key = self._key(q, k, v, seed, extra)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[0]
        self._entries[key] = (size, (q, k, v), value)
        self._bytes += size
        while self._bytes > self.budget_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][0]

    def take(self, q, k, v, seed, extra):
        """The saved value for the call (removed), or None."""
        if not self._entries or type(seed) is not torch.Tensor or seed.device.type != "cpu":
            return None
        hit = self._entries.pop(self._key(q, k, v, seed, extra), None)
        if hit is None:
            return None
        self._bytes -= hit[0]
        return hit[2]

    def clear(self):
        self._entries.clear()
        self._bytes = 0


# 128 MiB holds the P of a BERT-base step at 8 x 128 (~30 MB) several times; past it the oldest
# layers' backwards recompute (the last forwards are the first backwards).
SAVED = SavedProbs(128 << 20)
