"""Varlen attention with dropout on the CPU, one run of equal-length sequences at a time.

SDPA cannot take the shared Philox keep mask, so dropout runs the reference's composite math
(``fastbert.backends._composite.attention_math``: fp32 scores, softmax and products, P rounded to
q's dtype before ``P @ V``). Padding every sequence to ``max_seqlen`` first would spend about 3/4
of that work on padding at 50% fill (and the padded rows' masks); here each run of consecutive
sequences of equal length is a ``[n, len, H, d]`` view of the packed rows, computed without a key
mask and with the dropout counters of its own sequences (``first_sequence``), so the masks are the
same bits as the padded and every other backend's. Reading ``cu_seqlens`` is free on the CPU only.
"""

from __future__ import annotations

import torch

from fastbert.backends._composite import attention_math, attention_math_bwd


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


def varlen_dropout_fwd(q, k, v, out, cu_seqlens, *, dropout_p, seed, softmax_scale):
    """Writes ``out`` ``[total_tokens, H, d]`` for q/k/v ``[total_tokens, H, d]``."""
    for start, first, n, length in _runs(cu_seqlens):
        qs, ks, vs, os_ = _views(start, n, length, q, k, v, out)
        o, _ = attention_math(qs, ks, vs, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                              first_sequence=first)
        os_.copy_(o)


def varlen_dropout_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, *, dropout_p, seed, softmax_scale):
    """Writes dq, dk, dv (rows of empty sequences: none) by the composite backward per run."""
    for start, first, n, length in _runs(cu_seqlens):
        do, qs, ks, vs, gq, gk, gv = _views(start, n, length, dout, q, k, v, dq, dk, dv)
        grads = attention_math_bwd(do, qs, ks, vs, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                                   first_sequence=first)
        for g, dst in zip(grads[:3], (gq, gk, gv)):
            dst.copy_(g)
