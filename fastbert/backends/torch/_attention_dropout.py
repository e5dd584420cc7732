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
from the planes, the keep mask multiplied in as floats, and dS in two passes from P and P * keep.
The forward also keeps P and P * keep for the backward (:class:`SavedProbs`), so the backward
recomputes neither ``Q K^T``, the softmax nor the mask.
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


def _probs(qh, kh, softmax_scale):
    """P = softmax(scale * Q K^T) ``[nH, Lq, Lk]`` in the accumulation dtype."""
    return torch.softmax(torch.baddbmm(qh.new_empty(()), qh, kh.transpose(1, 2), beta=0.0, alpha=softmax_scale),
                         dim=-1)


def dropout_attention_fwd(q, k, v, out, keep, *, dropout_scale: float, softmax_scale: float):
    """``out`` ``[n, L, H, d]`` for q/k/v ``[n, L, H, d]`` and ``keep`` bool ``[n, H, L, L]``;
    returns ``(P, P * keep)`` (fp32; fp64 for fp64 inputs; ``[n * H, L, L]``, the dropout scale
    not applied), what :func:`dropout_attention_bwd` needs."""
    acc = acc_dtype(q.dtype)
    qh, kh, vh = (_heads(t, acc) for t in (q, k, v))
    probs = _probs(qh, kh, softmax_scale)
    dropped = probs * _keep_float(keep, acc)  # P * keep
    if q.dtype == acc:  # products in q's dtype: the scale folds into alpha, no rounding between
        o = torch.baddbmm(vh.new_empty(()), dropped, vh, beta=0.0, alpha=dropout_scale)
    else:
        o = round_to(dropped * dropout_scale, q.dtype) @ vh
    _store(out, o)
    return probs, dropped


def dropout_attention_bwd(dout, q, k, v, out, dq, dk, dv, keep, *, dropout_scale: float, softmax_scale: float,
                          saved=None):
    """Writes dq, dk, dv ``[n, L, H, d]``; ``saved``: :func:`dropout_attention_fwd`'s ``(P, P * keep)``
    for these inputs, or None to recompute them from q, k and ``keep``."""
    acc = acc_dtype(q.dtype)
    qh, kh, vh, doh = (_heads(t, acc) for t in (q, k, v, dout))
    if saved is None:
        probs = _probs(qh, kh, softmax_scale)
        saved = probs, probs * _keep_float(keep, acc)
    probs, dropped = saved
    # D = rowsum(dO * O) = rowsum(dP * P), from the [nH, L, d] tensors rather than the [nH, L, L] planes.
    delta = (doh * _heads(out, acc)).sum(-1, keepdim=True)  # [nH, L, 1]
    # dS = P * (dO V^T * keep * s - D) = s * ((dO V^T) * (P * keep) - P * D / s), s = dropout_scale:
    # two passes over the planes, s applied with the products below.
    ds = torch.bmm(doh, vh.transpose(1, 2)).mul_(dropped).addcmul_(probs, delta, value=-1.0 / dropout_scale)
    if q.dtype == acc:
        dv_ = torch.baddbmm(vh.new_empty(()), dropped.transpose(1, 2), doh, beta=0.0, alpha=dropout_scale)
        alpha = softmax_scale * dropout_scale
    else:  # P * Z and dS rounded to q's dtype before their products, as the kernels do
        dv_ = round_to(dropped * dropout_scale, q.dtype).transpose(1, 2) @ doh
        ds = round_to(ds.mul_(dropout_scale), q.dtype)
        alpha = softmax_scale
    dq_ = torch.baddbmm(qh.new_empty(()), ds, kh, beta=0.0, alpha=alpha)
    dk_ = torch.baddbmm(kh.new_empty(()), ds.transpose(1, 2), qh, beta=0.0, alpha=alpha)
    for dst, g in ((dq, dq_), (dk, dk_), (dv, dv_)):
        _store(dst, g)


class SavedProbs:
    """P and P * keep of the last dropout forwards, for their backwards (they cost a ``Q K^T``,
    a softmax and the mask to recompute; two ``[heads, L, L]`` fp32 planes per sequence, ~4.5 MB
    per BERT-base layer at 8 x 128 and 50% fill). An entry is keyed by the call's inputs — q, k, v by address, shape,
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


# 128 MiB holds what a BERT-base step at 8 x 128 saves (12 layers, ~55 MB) twice; past it the oldest
# layers' backwards recompute (the last forwards are the first backwards).
SAVED = SavedProbs(128 << 20)
