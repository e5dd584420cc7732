"""The torch composite backend: ``scaled_dot_product_attention``, ``native_layer_norm``, GELU math.

The fast default on CPU and the fallback everywhere. Varlen attention runs one sequence at a time
on CPU (no padding at all; reading ``cu_seqlens`` is a free host sync there) and is re-padded only
inside attention elsewhere. Outputs are computed into the preallocated tensors (``out=``) where
aten allows it, saving the copy a temporary would cost. With dropout, attention needs the shared
Philox keep mask, which SDPA cannot take, so it runs the reference's composite math instead, and
backward is that composite's backward (this backend writes no ``lse``).

Padded attention with a mask runs each sequence on its valid keys on CPU (masked keys never meet
a product, whatever they hold; padded keys cost nothing), and reads a broadcast ``attn_bias`` in
its compact shape (SDPA broadcasts it in place: no ``[B, H, Lq, Lk]`` temporaries).

Known difference from the reference: PyTorch's CPU ``scaled_dot_product_attention`` returns 0 for
a query row containing NaN (the reference propagates NaN); non-finite ``softmax_scale`` is
rejected by ``fastbert.ops`` for every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert.backends import reference
from fastbert.backends._philox import (COLUMNS_PER_CALL, _buffers, _keep_into, _round_keys, dropout_scale,
                                      dropout_threshold, rows_keep_mask)
from fastbert.backends.reference import _pad_varlen, attention_math

# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def _compact_bias(attn_bias, q):
    """The 4-D bias view with its broadcast (stride-0) dims narrowed to size 1, in a dtype SDPA
    takes beside q (q's own or fp32; else the exact widening to fp32 / fp64): a ``[1, 1, 1, L]``
    bias stays ``[1, 1, 1, L]`` through every step below (SDPA broadcasts it in place), never
    ``[B, H, Lq, Lk]``."""
    if attn_bias is None:
        return None
    idx = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                for st, n in zip(attn_bias.stride(), attn_bias.shape))
    bias = attn_bias[idx]
    if bias.dtype != q.dtype and not (bias.dtype == torch.float32 and q.dtype in (torch.float16, torch.bfloat16)):
        # SDPA takes q's dtype, or fp32 beside fp16/bf16 (it adds the bias in fp32 either way)
        bias = bias.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return bias


def _sdpa_heads_first(q, k, v, bias, softmax_scale):
    """SDPA on heads-first ``[B, H, L, d]`` with an additive (compact) bias or None; a row whose
    keys are all biased ``-inf`` returns zeros (its mask is opened to every key so it is not NaN,
    and its output is zeroed after)."""
    has_key = None
    if bias is not None:
        excluded = torch.isneginf(bias)
        if bias.device.type != "cpu" or bool(excluded.any()):  # (free to ask on CPU)
            has_key = ~excluded.all(dim=-1, keepdim=True)  # [*, *, *, 1], compact
            bias = bias.masked_fill(~has_key, 0.0)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=softmax_scale)  # [B, H, Lq, d]
    if has_key is not None:
        o = torch.where(has_key, o, o.new_zeros(()))
    return o


def _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out):
    """SDPA on ``[batch, seqlen, num_heads, head_dim]`` into ``out``, empty rows returning zeros.

    Keys masked by ``attention_mask`` have no influence whatever K and V hold there (NaN, Inf):
    on CPU each sequence runs on its valid keys only (a view when they are a prefix, a gather of
    that sequence's keys otherwise; reading the mask is free there), which also skips the padded
    keys' work; elsewhere the masked K and V rows are replaced by zeros. The bias is read in its
    compact shape (see :func:`_compact_bias`).
    """
    bias = _compact_bias(attn_bias, q)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d] views
    if attention_mask is None:
        return out.copy_(_sdpa_heads_first(qh, kh, vh, bias, softmax_scale).transpose(1, 2))
    if q.device.type != "cpu":
        key_ok = attention_mask[:, None, :, None]
        kh, vh = (torch.where(key_ok, t, t.new_zeros(())) for t in (kh, vh))
        base = bias if bias is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(attention_mask[:, None, None, :], base, float("-inf"))  # [B, *, *, Lk]
        return out.copy_(_sdpa_heads_first(qh, kh, vh, bias, softmax_scale).transpose(1, 2))
    for b, n in enumerate(attention_mask.sum(1).tolist()):
        keys = attention_mask[b]
        if n == 0:  # every key masked: empty rows
            out[b].zero_()
            continue
        bb = None if bias is None else bias[b if bias.shape[0] > 1 else 0][None]  # [1, *, *, 1|Lk]
        if bool(keys[:n].all()):  # right padding: the valid keys are a prefix (views)
            kb, vb = kh[b:b + 1, :, :n], vh[b:b + 1, :, :n]
            bb = bb[..., :n] if bb is not None and bb.shape[-1] > 1 else bb
        else:
            idx = keys.nonzero().squeeze(1)
            kb, vb = kh[b:b + 1].index_select(2, idx), vh[b:b + 1].index_select(2, idx)
            bb = bb.index_select(3, idx) if bb is not None and bb.shape[-1] > 1 else bb
        out[b].copy_(_sdpa_heads_first(qh[b:b + 1], kb, vb, bb, softmax_scale)[0].transpose(0, 1))
    return out


def _sdpa_per_sequence(q, k, v, out, cu_seqlens, softmax_scale):
    """Varlen SDPA one sequence at a time, reading q/k/v in place and writing ``out`` directly.

    No padding: no zero-fill, no scatter/gather copies, and no work on padded keys or queries
    (padding to ``max_seqlen`` at 50% fill spends about 3/4 of the attention FLOPs on padding).
    Reading ``cu_seqlens`` is a host sync, free on CPU, so this path is CPU-only.
    """
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:  # an empty sequence has no rows to write
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, len, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
        out[start:end].copy_(o[0].transpose(0, 1))


def _sdpa_per_sequence_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, softmax_scale):
    """Backward of :func:`_sdpa_per_sequence`: recompute each sequence's SDPA and differentiate it
    (aten's CPU flash backward), writing the slices of dq/dk/dv. No padded rows, as in forward."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        # Explicit aten forward + backward: inside a custom op autograd dispatch is excluded, so
        # SDPA would record no graph even under torch.enable_grad().
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qs, ks, vs, 0.0, False, scale=softmax_scale)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout[start:end].transpose(0, 1).unsqueeze(0), qs, ks, vs, o, lse, 0.0, False,
            scale=softmax_scale)
        for g, dst in zip(grads, (dq, dk, dv)):
            dst[start:end].copy_(g[0].transpose(0, 1))


def _attention(q, k, v, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
               softmax_scale):
    mask = attention_mask
    if cu_seqlens is not None:
        q, mask = _pad_varlen(q, cu_seqlens, max_seqlen)
        k, _ = _pad_varlen(k, cu_seqlens, max_seqlen)
        v, _ = _pad_varlen(v, cu_seqlens, max_seqlen)
    if dropout_p > 0.0:
        out, _ = attention_math(q, k, v, attention_mask=mask, attn_bias=attn_bias,
                                dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)
    else:
        out = _sdpa(q, k, v, mask, attn_bias, softmax_scale, torch.empty_like(q))
    return out[mask] if cu_seqlens is not None else out


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False, window=None):
    """Backend entry point (see ``fastbert.backends``); leaves ``lse`` unwritten."""
    if window is not None and _window_covers_all(window, *_window_bounds(q, k, cu_seqlens, max_seqlen)):
        window = None  # every key inside every row's window: global attention, on its faster paths
    if window is not None:
        return _window_attention_fwd(q, k, v, out, attention_mask=attention_mask, attn_bias=attn_bias,
                                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p,
                                     seed=seed, softmax_scale=softmax_scale, window=window)
    with torch.no_grad():
        if (cu_seqlens is not None and q.device.type == "cpu" and dropout_p == 0.0
                and attn_bias is None):
            return _sdpa_per_sequence(q, k, v, out, cu_seqlens, softmax_scale)
        if cu_seqlens is None and dropout_p == 0.0:
            return _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out)
        out.copy_(_attention(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                             cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p,
                             seed=seed, softmax_scale=softmax_scale))


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False, window=None):
    """Backend entry point: per sequence through SDPA's CPU backward where the forward ran per
    sequence; otherwise the reference's composite backward (recompute P with matmuls)."""
    if window is not None and _window_covers_all(window, *_window_bounds(q, k, cu_seqlens, max_seqlen)):
        window = None  # as forward
    if window is not None:
        return _window_attention_bwd(dout, q, k, v, dq, dk, dv, dbias, attention_mask=attention_mask,
                                     attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                     dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                                     window=window)
    if (cu_seqlens is not None and q.device.type == "cpu" and dropout_p == 0.0
            and attn_bias is None):
        return _sdpa_per_sequence_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, softmax_scale)
    reference.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, attention_mask=attention_mask,
                            attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)


# ----------------------------------------------------------------------------------------------
# attention with a local window, blockwise
# ----------------------------------------------------------------------------------------------

# Query rows per block. A block of WINDOW_BLOCK rows meets WINDOW_BLOCK + left + right keys, so the
# work is seqlen x (WINDOW_BLOCK + left + right), never seqlen^2; smaller blocks waste fewer
# out-of-band scores but pay the per-block op overhead more often.
WINDOW_BLOCK = 64


def _window_covers_all(window, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether every key is inside every row's window (the window is then global attention)."""
    return window[0] >= seqlen_q - 1 and window[1] >= seqlen_k - 1


def _window_bounds(q, k, cu_seqlens, max_seqlen) -> tuple[int, int]:
    """(seqlen_q, seqlen_k) the window's indices range over: padded dims, or max_seqlen in varlen."""
    return (max_seqlen, max_seqlen) if cu_seqlens is not None else (q.shape[1], k.shape[1])


def _window_blocks(seqlen_q: int, seqlen_k: int, window):
    """``(qs, qe, ks, ke)`` per block of query rows ``[qs, qe)`` with the key range ``[ks, ke)`` its
    windows reach (``ks >= ke``: every row of the block is empty)."""
    left, right = window
    for qs in range(0, seqlen_q, WINDOW_BLOCK):
        qe = min(qs + WINDOW_BLOCK, seqlen_q)
        yield qs, qe, max(0, qs - left), min(seqlen_k, qe + right)


def _block_keep(seed, dropout_p, seqs, num_heads, qs, qe, ks, ke, device):
    """The shared Philox keep mask (``fastbert.backends._philox``, counter = (key // 8, row, head,
    sequence)) of rows ``[qs, qe)`` x keys ``[ks, ke)`` only: bool ``[len(seqs), H, qe - qs, ke - ks]``,
    bit-identical to that block of the full mask, at the block's cost."""
    g0, g1 = ks // COLUMNS_PER_CALL, -(-ke // COLUMNS_PER_CALL)
    ar = lambda a, b: torch.arange(a, b, device=device, dtype=torch.int64)  # noqa: E731
    counters = (ar(g0, g1).view(1, 1, 1, -1), ar(qs, qe).view(1, 1, -1, 1), ar(0, num_heads).view(1, -1, 1, 1),
                seqs.view(-1, 1, 1, 1))
    shape = (seqs.numel(), num_heads, qe - qs, g1 - g0)
    keep = torch.empty(shape + (COLUMNS_PER_CALL,), dtype=torch.bool, device=device)
    _keep_into(keep, counters, _round_keys(seed, device), dropout_threshold(dropout_p),
               _buffers(keep.numel() // COLUMNS_PER_CALL, device))
    off = ks - g0 * COLUMNS_PER_CALL
    return keep.flatten(-2)[..., off:off + ke - ks]


class _Slab:
    """One heads-first slab of the problem in the accumulation dtype: q/k/v ``[b, H, L, d]``, the
    key mask ``[b, Lk]`` (or None), the bias view ``[b, H, Lq, Lk]`` (or None) and the logical
    sequence index of each of the b rows (the dropout counters)."""

    def __init__(self, q, k, v, key_ok, bias, seqs):
        self.q, self.k, self.v, self.key_ok, self.bias, self.seqs = q, k, v, key_ok, bias, seqs

    def block(self, qs, qe, ks, ke, window, softmax_scale, dropout_p, seed):
        """Scores of one block and everything backward needs: ``(qb, kb, vb, probs, z)`` with the
        masked keys' K / V rows zeroed, probs ``[b, H, nq, nk]`` (0 outside the window and on empty
        rows) and z the dropout factor (keep * scale) or None. As the reference computes it."""
        qb, kb, vb = self.q[:, :, qs:qe], self.k[:, :, ks:ke], self.v[:, :, ks:ke]
        i = torch.arange(qs, qe, device=qb.device)[:, None]
        j = torch.arange(ks, ke, device=qb.device)[None, :]
        allowed = (j >= i - window[0]) & (j <= i + window[1])  # [nq, nk]
        if self.key_ok is not None:
            ok = self.key_ok[:, None, ks:ke, None]  # [b, 1, nk, 1]
            kb, vb = torch.where(ok, kb, 0.0), torch.where(ok, vb, 0.0)
            allowed = allowed & ok.transpose(-1, -2)  # [b, 1, nq, nk]
        scores = softmax_scale * (qb @ kb.transpose(-1, -2))  # [b, H, nq, nk]
        if self.bias is not None:
            bb = self.bias[:, :, qs:qe, ks:ke]
            scores = scores + bb.to(scores.dtype)
            allowed = allowed & (bb != float("-inf"))
        allowed = allowed.expand(scores.shape)
        has_key = allowed.any(dim=-1, keepdim=True)
        scores = torch.where(has_key, torch.where(allowed, scores, float("-inf")), 0.0)
        probs = torch.softmax(scores, dim=-1) * has_key
        z = None
        if dropout_p > 0.0:
            keep = _block_keep(seed, dropout_p, self.seqs, qb.shape[1], qs, qe, ks, ke, qb.device)
            z = keep.to(probs.dtype) * dropout_scale(dropout_p)  # (bool * float would be fp32)
        return qb, kb, vb, probs, z

    def forward(self, out, window, softmax_scale, dropout_p, seed, in_dtype):
        """out ``[b, H, Lq, d]`` (any dtype, written in full)."""
        for qs, qe, ks, ke in _window_blocks(self.q.shape[2], self.k.shape[2], window):
            if ks >= ke:
                out[:, :, qs:qe].zero_()
                continue
            _, _, vb, probs, z = self.block(qs, qe, ks, ke, window, softmax_scale, dropout_p, seed)
            if z is not None:
                probs = probs * z
            out[:, :, qs:qe] = reference._round_to(probs, in_dtype) @ vb

    def backward(self, do, dq, dk, dv, dbias, window, softmax_scale, dropout_p, seed, in_dtype):
        """The reference's backward formulas block by block (see ``reference.attention_math_bwd``):
        dq ``[b, H, Lq, d]`` written per block; dk, dv accumulated in place (zero them first) in
        the accumulation dtype; dbias ``[b, H, Lq, Lk]`` written inside each block's key range
        (zero it first: it is 0 outside the window)."""
        for qs, qe, ks, ke in _window_blocks(self.q.shape[2], self.k.shape[2], window):
            if ks >= ke:
                dq[:, :, qs:qe] = 0.0
                continue
            qb, kb, vb, probs, z = self.block(qs, qe, ks, ke, window, softmax_scale, dropout_p, seed)
            dob = do[:, :, qs:qe]
            pz = probs if z is None else probs * z
            dv[:, :, ks:ke] += reference._round_to(pz, in_dtype).transpose(-1, -2) @ dob
            dprobs = dob @ vb.transpose(-1, -2)
            if z is not None:
                dprobs = dprobs * z
            delta = (dprobs * probs).sum(dim=-1, keepdim=True)
            dscores = probs * (dprobs - delta)
            ds = reference._round_to(dscores, in_dtype)
            dq[:, :, qs:qe] = softmax_scale * (ds @ kb)
            dk[:, :, ks:ke] += softmax_scale * (ds.transpose(-1, -2) @ qb)
            if dbias is not None:
                dbias[:, :, qs:qe, ks:ke] = dscores


def _window_slabs(q, k, v, attention_mask, attn_bias, cu_seqlens, max_seqlen):
    """``(slab, index)`` pairs covering the problem in the accumulation dtype: the whole padded
    batch as one slab (index: a slice of the batch dim); varlen on CPU one sequence per slab (a
    free host sync there; index: its token range), else re-padded to ``max_seqlen`` (index: the
    padding mask)."""
    acc = reference._acc_dtype(q.dtype)
    heads_first = lambda t: t.to(acc).transpose(-3, -2)  # noqa: E731  [.., L, H, d] -> [.., H, L, d]
    if cu_seqlens is None:
        seqs = torch.arange(q.shape[0], device=q.device)
        yield _Slab(heads_first(q), heads_first(k), heads_first(v), attention_mask, attn_bias, seqs), slice(None)
        return
    if q.device.type == "cpu":
        bounds = cu_seqlens.tolist()
        for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if end > start:
                parts = (heads_first(t[start:end])[None] for t in (q, k, v))
                yield _Slab(*parts, None, None, torch.tensor([b], device=q.device)), slice(start, end)
        return
    padded = [_pad_varlen(t, cu_seqlens, max_seqlen) for t in (q, k, v)]
    mask = padded[0][1]
    seqs = torch.arange(mask.shape[0], device=q.device)
    yield _Slab(*(heads_first(t) for t, _ in padded), mask, None, seqs), mask


def _window_attention_fwd(q, k, v, out, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                          dropout_p, seed, softmax_scale, window):
    """Local-window attention into ``out``, block by block (:data:`WINDOW_BLOCK` query rows meet
    only the keys their windows reach): the reference's math and numerics (fp32 / fp64
    accumulation, P rounded to q's dtype before ``P @ V``, the shared dropout mask drawn per block)
    at a cost of seqlen x (block + window) instead of seqlen^2."""
    with torch.no_grad():
        for slab, idx in _window_slabs(q, k, v, attention_mask, attn_bias, cu_seqlens, max_seqlen):
            o = torch.empty_like(slab.q)
            slab.forward(o, window, softmax_scale, dropout_p, seed, q.dtype)
            o = o.transpose(-3, -2)  # [.., L, H, d]
            if isinstance(idx, slice):
                out[idx] = o[0] if cu_seqlens is not None else o
            else:
                out.copy_(o[idx])
    return out


def _window_attention_bwd(dout, q, k, v, dq, dk, dv, dbias, *, attention_mask, attn_bias, cu_seqlens,
                          max_seqlen, dropout_p, seed, softmax_scale, window):
    """Gradients of :func:`_window_attention_fwd` into dq, dk, dv (and the full dbias, 0 outside the
    window, when asked), block by block; deterministic (one fixed order of accumulation)."""
    with torch.no_grad():
        if dbias is not None:
            dbias.zero_()
        for slab, idx in _window_slabs(q, k, v, attention_mask, attn_bias, cu_seqlens, max_seqlen):
            if isinstance(idx, slice):
                do = dout[idx] if cu_seqlens is None else dout[idx][None]
            else:
                do = _pad_varlen(dout, cu_seqlens, max_seqlen)[0]
            do = do.to(slab.q.dtype).transpose(-3, -2)
            gq = torch.empty_like(slab.q)
            gk, gv = torch.zeros_like(slab.k), torch.zeros_like(slab.v)
            slab.backward(do, gq, gk, gv, dbias, window, softmax_scale, dropout_p, seed, q.dtype)  # no bias in varlen
            for g, dst in zip((gq, gk, gv), (dq, dk, dv)):
                g = g.transpose(-3, -2)
                if isinstance(idx, slice):
                    dst[idx] = g[0] if cu_seqlens is not None else g
                else:
                    dst.copy_(g[idx])


# ----------------------------------------------------------------------------------------------
# LayerNorm (add & norm)
# ----------------------------------------------------------------------------------------------


# A row whose |mean| * rstd (its mean in units of its spread) exceeds this is ill-conditioned for
# aten's CPU forward: its one-pass statistics lose about |mean| * rstd * 2^-24 in y (a constant
# row of 100 with eps = 1e-12 has |mean| * rstd = 1e8: y is off by whole units; measured on
# 16 x 768 fp32 rows, aten's y error is 1.7x the reference's at |mean| * rstd = 32). Such rows are
# found from the statistics alone and recomputed by the reference's two-pass math; a row whose
# mean is small against its spread never is. (The backward is made stable another way: see
# layer_norm_bwd.)
ILL_CONDITIONED = 16.0


# The backward's threshold: aten's expanded form already errs 2-7x the reference's at
# |mean| * rstd = 4.5-11 on short rows (fuzzed), so a row whose mean exceeds its spread at all
# takes the centred form (see layer_norm_bwd).
BWD_ILL_CONDITIONED = 1.0


def _ill_conditioned_rows(mean, rstd, threshold=ILL_CONDITIONED):
    """Indices of the rows aten's forward cannot be trusted with, or None (the common case: one [rows]
    comparison and a nonzero, no [rows, hidden] work). Skipped while capturing a CUDA graph (the
    nonzero is a host sync); on a GPU Triton or CUDA normally runs LayerNorm anyway."""
    if mean.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    idx = (mean.abs() * rstd > threshold).nonzero().view(-1)
    return idx if idx.numel() else None


def _aten_params(weight, bias, dtype):
    """weight/bias in one dtype aten's CPU kernels accept: x's dtype for fp32/fp64, fp32 for
    fp16/bf16 (aten's mixed-dtype mode). Exact casts of ``[hidden]`` vectors."""
    pdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return tuple(None if t is None else t.to(pdt) for t in (weight, bias))


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Backend entry point: ``h = dropout(x + x_bias) + residual``, ``y = LN(h)``.

    Computes straight into the preallocated ``h`` (and, for fp32/fp64, ``y``/``mean``/``rstd`` via
    ``native_layer_norm.out``): no temporaries and no copies, in the same order of operations.
    Rows that are ill-conditioned for aten (:data:`ILL_CONDITIONED`) are then recomputed by the
    reference.
    """
    hh = x
    if h is not None and x.dtype in (torch.float16, torch.bfloat16):
        # In fp32, rounded once to x's dtype, as the kernels and the reference store h.
        h.copy_(reference.add_dropout_residual(x, residual, x_bias, dropout_p, seed))
        hh = h
    elif h is not None:
        if x_bias is not None:
            hh = torch.add(hh, x_bias.to(x.dtype), out=h)
        if dropout_p > 0.0:
            keep = rows_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
            hh = torch.mul(hh, keep, out=h).mul_(dropout_scale(dropout_p))
        if residual is not None:
            hh = torch.add(hh, residual, out=h)
        if hh is not h:
            h.copy_(hh)
        hh = h
    w, b = _aten_params(weight, bias, x.dtype)
    if mean.dtype == x.dtype:  # fp32/fp64: aten's statistics already have the contract's dtype
        torch.ops.aten.native_layer_norm.out(hh, (x.shape[-1],), w, b, eps, out0=y,
                                             out1=mean.view(-1, 1), out2=rstd.view(-1, 1))
    else:
        yy, m, r = torch.native_layer_norm(hh, (x.shape[-1],), w, b, eps)
        y.copy_(yy)
        mean.copy_(m.view(-1))
        rstd.copy_(r.view(-1))
    idx = _ill_conditioned_rows(mean, rstd)
    if idx is not None:
        y[idx], mean[idx], rstd[idx] = reference.layer_norm_math(hh[idx], weight, bias, eps)


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
                   seed):
    """Backend entry point via ``aten.native_layer_norm_backward`` on the centred rows.

    aten's backward forms ``dh = a * g + b * h + c`` with ``c = -b * mean - ...``: for a row whose
    mean is large against its spread, ``b * h`` and ``b * mean`` cancel (measured: a gradient of
    -4194304 for a constant row of 100, 2-5x the reference's fp32 error from |mean| * rstd = 32
    on, 7x on 2-element rows at |mean| * rstd = 9). Handing it ``h - mean`` with a zero mean
    makes ``b * h`` the reference's ``xhat`` term: stable for every row, for the cost of one
    ``[rows, hidden]`` subtraction (measured on 1024 x 768 fp32 rows, 1 thread: +29% of the
    backward), paid only when some row has ``|mean| * rstd >`` :data:`BWD_ILL_CONDITIONED` or x is
    fp16 / bf16. fp16/bf16 run in fp32 (dh, dweight and dx_bias from unrounded values, as the
    kernels compute them), rounded once into dx / dresidual. Rows of 1 or 2
    elements, whose exact dh is 0, take the reference's form (aten's leaves rstd * |g| * 2^-24).
    """
    hidden = h.shape[-1]
    if hidden <= 2:  # y is constant in h (+-1 or 0): dh is 0, which aten's expanded form misses
        return reference.layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias,
                                        dropout_p=dropout_p, seed=seed)
    stat = mean.dtype  # fp32, fp64 for fp64 h
    w = None if weight is None else weight.to(stat)
    if h.dtype == stat and _ill_conditioned_rows(mean, rstd, BWD_ILL_CONDITIONED) is None:
        # The common case: no row with |mean| > its spread; aten's form loses nothing there.
        dh, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dy, h, (hidden,), mean.view(-1, 1), rstd.view(-1, 1), w, None, [True, dweight is not None, False])
    else:
        centred = torch.sub(h.to(stat), mean.view(-1, 1))
        dh, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dy.to(stat), centred, (hidden,), torch.zeros_like(mean).view(-1, 1), rstd.view(-1, 1), w, None,
            [True, dweight is not None, False])
    if dweight is not None:
        dweight.copy_(dw)
    if dbias is not None:
        dbias.copy_(dy.sum(0, dtype=stat))
    if dresidual is not None:
        dresidual.copy_(dh)
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, h.shape[0], hidden, device=h.device)
        dh = torch.mul(dh, keep, out=dx if dx.dtype == dh.dtype else None).mul_(dropout_scale(dropout_p))
    if dh is not dx:
        dx.copy_(dh)
    if dx_bias is not None:
        dx_bias.copy_(dh.sum(0))


# ----------------------------------------------------------------------------------------------
# GELU with bias
# ----------------------------------------------------------------------------------------------


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(x + bias)``.

    fp32/fp64: ``F.gelu``. fp16/bf16: the reference's erfc / sigmoid form in fp32, because
    ``F.gelu``'s ``1 + erf`` (``1 + tanh``) cancels for x < -4 and lands whole units in the last
    place of fp16/bf16 away there.

    fp32 accuracy (documented, not matched): aten's fp32 GELU keeps the absolute error below
    ``2^-22 * max(1, |z|)`` (measured on [-20, 20]: 1.6e-7 * max(1, |z|), forward and gradient),
    but in the negative tail its relative error grows: 4e-3 on [-4, -2], and ``gelu(-6)`` is -0
    (the reference, Triton and CUDA give -5.9e-9). The erfc form would match the reference there
    at 2.7x the cost of the fused ``F.gelu`` (1024 x 3072 fp32, 1 thread: 14.1 vs 5.2 ms), on the
    FFN of every CPU forward; Hugging Face's BERT calls the same ``F.gelu``.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return reference.gelu_fwd(x, bias, y, approximate=approximate)
    src = x if bias is None else torch.add(x, bias.to(x.dtype), out=y)
    torch._C._nn.gelu(src, approximate=approximate, out=y)  # elementwise: in place is safe


def gelu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: ``aten.gelu_backward`` (fp32/fp64) or the reference (fp16/bf16)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return reference.gelu_bwd(dy, x, bias, dx, dbias, approximate=approximate)
    z = x if bias is None else torch.add(x, bias.to(x.dtype), out=dx)  # dx as the z workspace
    torch.ops.aten.gelu_backward.grad_input(dy, z, approximate=approximate, grad_input=dx)
    if dbias is not None:
        dbias.copy_(dx.sum(0, dtype=dbias.dtype))
