"""Varlen attention with dropout on the CPU, one run of equal-length sequences at a time.

SDPA cannot take the shared Philox keep mask, so dropout runs the contract's composite math
(fp32 scores, softmax and products, P rounded to q's dtype before ``P @ V``), streamlined for a
block without key masks in :mod:`._attention_dropout`, which also keeps the forward's softmax for
the backward. Padding every sequence to ``max_seqlen`` first would spend about 3/4
of that work on padding at 50% fill (and the padded rows' masks); here each run of consecutive
sequences of equal length is a ``[n, len, H, d]`` view of the packed rows, computed without a key
mask and with the dropout counters of its own sequences (``first_sequence``), so the masks are the
same bits as the padded and every other backend's. Reading ``cu_seqlens`` is free on the CPU only.
"""

from __future__ import annotations

from fastbert.backends._philox import attention_keep_mask, dropout_scale
from fastbert.backends.torch._attention_dropout import SAVED, dropout_attention_bwd, dropout_attention_fwd


def _runs(cu_seqlens):
    """``(first row, first sequence, number of sequences, length)`` of each run of consecutive
    non-empty sequences of equal length (one host read); empty sequences have no rows."""
    bounds = cu_seqlens.tolist()
    runs = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        length = end - start
        if length == 0:
            continue
        last = runs[-1] if runs else None
        if last and last[3] == length and last[0] + last[2] * length == start and last[1] + last[2] == b:
            last[2] += 1
        else:
            runs.append([start, b, 1, length])
    return runs


def _views(start, n, length, *tensors):
    rows = slice(start, start + n * length)
    return [t[rows].view((n, length) + tuple(t.shape[1:])) for t in tensors]  # [n, len, H, d]


def _extra(cu_seqlens, dropout_p, softmax_scale):
    return ("varlen", tuple(cu_seqlens.tolist()), dropout_p, softmax_scale)


def varlen_dropout_fwd(q, k, v, out, cu_seqlens, *, dropout_p, seed, softmax_scale):
    """Writes ``out`` ``[total_tokens, H, d]`` for q/k/v ``[total_tokens, H, d]``; keeps each run's
    softmax for the backward (:data:`SAVED`) when q, k or v require a gradient."""
    saved = []
    for start, first, n, length in _runs(cu_seqlens):
        qs, ks, vs, os_ = _views(start, n, length, q, k, v, out)
        keep = attention_keep_mask(seed, dropout_p, n, q.shape[1], length, length, first_sequence=first)
        saved += dropout_attention_fwd(qs, ks, vs, os_, keep, dropout_scale=dropout_scale(dropout_p),
                                       softmax_scale=softmax_scale)
    if SAVED.wanted(q, k, v, seed):
        SAVED.put(q, k, v, seed, _extra(cu_seqlens, dropout_p, softmax_scale), saved)


def varlen_dropout_bwd(dout, q, k, v, out, dq, dk, dv, cu_seqlens, *, dropout_p, seed, softmax_scale):
    """Writes dq, dk, dv (rows of empty sequences: none) per run, from the forward's saved softmax
    when it is there, else recomputing it."""
    saved = SAVED.take(q, k, v, seed, _extra(cu_seqlens, dropout_p, softmax_scale))
    for i, (start, first, n, length) in enumerate(_runs(cu_seqlens)):
        do, qs, ks, vs, os_, gq, gk, gv = _views(start, n, length, dout, q, k, v, out, dq, dk, dv)
        keep = None if saved else attention_keep_mask(seed, dropout_p, n, q.shape[1], length, length,
                                                      first_sequence=first)
        dropout_attention_bwd(do, qs, ks, vs, os_, gq, gk, gv, keep, dropout_scale=dropout_scale(dropout_p),
                              softmax_scale=softmax_scale, saved=saved[2 * i:2 * i + 2] if saved else None)
