"""Attention with a local window on the torch backend, blockwise: each block of query rows meets only
the keys its rows' windows reach, so the cost grows with seqlen x window, not seqlen^2."""

from __future__ import annotations

import torch

from fastbert.backends import _composite as composite
from fastbert.backends._philox import attention_keep_block, dropout_scale
from fastbert.backends._composite import pad_varlen

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
        scores = torch.matmul(qb, kb.transpose(-1, -2)).mul_(softmax_scale)  # [b, H, nq, nk]
        if self.bias is not None:
            bb = self.bias[:, :, qs:qe, ks:ke]
            scores.add_(bb.to(scores.dtype))
            allowed = allowed & (bb != float("-inf"))
        if self.key_ok is None and self.bias is None and qe - 1 - window[0] < self.k.shape[2]:
            # Every row of the block has a key (its window meets [0, seqlen_k)): no empty rows.
            probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        else:
            allowed = allowed.expand(scores.shape)
            has_key = allowed.any(dim=-1, keepdim=True)
            scores = torch.where(has_key, torch.where(allowed, scores, float("-inf")), 0.0)
            probs = torch.softmax(scores, dim=-1) * has_key
        z = None
        if dropout_p > 0.0:
            keep = attention_keep_block(seed, dropout_p, self.seqs, qb.shape[1], qs, qe, ks, ke, qb.device)
            z = keep.to(probs.dtype) * dropout_scale(dropout_p)  # (bool * float would be fp32)
        return qb, kb, vb, probs, z

    def band_bias(self, qs, qe, ks, ke, window, dropout_p):
        """The block's band as an additive ``[nq, nk]`` mask (0 / -inf) for aten's CPU flash
        attention, when that kernel can run the block: CPU, no key mask, bias or dropout, and no
        empty row; else None. Interior blocks share one geometry, so the mask is built once."""
        if (self.q.device.type != "cpu" or self.key_ok is not None or self.bias is not None or dropout_p > 0.0
                or qe - 1 - window[0] >= self.k.shape[2]):
            return None
        key = (qs - ks, qe - qs, ke - ks)
        cache = self.__dict__.setdefault("_bands", {})
        if key not in cache:
            i = torch.arange(qs, qe)[:, None]
            j = torch.arange(ks, ke)[None, :]
            inside = (j >= i - window[0]) & (j <= i + window[1])
            cache[key] = torch.zeros(inside.shape, dtype=self.q.dtype).masked_fill_(~inside, float("-inf"))
        return cache[key]

    def forward(self, out, window, softmax_scale, dropout_p, seed, in_dtype):
        """out ``[b, H, Lq, d]`` (any dtype, written in full)."""
        for qs, qe, ks, ke in _window_blocks(self.q.shape[2], self.k.shape[2], window):
            if ks >= ke:
                out[:, :, qs:qe].zero_()
                continue
            band = self.band_bias(qs, qe, ks, ke, window, dropout_p)
            if band is not None:  # one fused kernel per block
                out[:, :, qs:qe], _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    self.q[:, :, qs:qe], self.k[:, :, ks:ke], self.v[:, :, ks:ke], 0.0, False, attn_mask=band,
                    scale=softmax_scale)
                continue
            _, _, vb, probs, z = self.block(qs, qe, ks, ke, window, softmax_scale, dropout_p, seed)
            if z is not None:
                probs = probs * z
            out[:, :, qs:qe] = composite.round_to(probs, in_dtype) @ vb

    def backward(self, do, dq, dk, dv, dbias, window, softmax_scale, dropout_p, seed, in_dtype):
        """The reference's backward formulas block by block (see ``reference.attention_math_bwd``):
        dq ``[b, H, Lq, d]`` written per block; dk, dv accumulated in place (zero them first) in
        the accumulation dtype; dbias ``[b, H, Lq, Lk]`` written inside each block's key range
        (zero it first: it is 0 outside the window)."""
        for qs, qe, ks, ke in _window_blocks(self.q.shape[2], self.k.shape[2], window):
            if ks >= ke:
                dq[:, :, qs:qe] = 0.0
                continue
            band = self.band_bias(qs, qe, ks, ke, window, dropout_p)
            if band is not None:  # aten's CPU flash forward + backward of the block
                qb, kb, vb = self.q[:, :, qs:qe], self.k[:, :, ks:ke], self.v[:, :, ks:ke]
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qb, kb, vb, 0.0, False, attn_mask=band, scale=softmax_scale)
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    do[:, :, qs:qe], qb, kb, vb, o, lse, 0.0, False, attn_mask=band, scale=softmax_scale)
                dq[:, :, qs:qe] = gq
                dk[:, :, ks:ke] += gk
                dv[:, :, ks:ke] += gv
                continue
            qb, kb, vb, probs, z = self.block(qs, qe, ks, ke, window, softmax_scale, dropout_p, seed)
            dob = do[:, :, qs:qe]
            pz = probs if z is None else probs * z
            dv[:, :, ks:ke] += composite.round_to(pz, in_dtype).transpose(-1, -2) @ dob
            dprobs = dob @ vb.transpose(-1, -2)
            if z is not None:
                dprobs = dprobs * z
            delta = (dprobs * probs).sum(dim=-1, keepdim=True)
            dscores = probs * (dprobs - delta)
            ds = composite.round_to(dscores, in_dtype)
            dq[:, :, qs:qe] = softmax_scale * (ds @ kb)
            dk[:, :, ks:ke] += softmax_scale * (ds.transpose(-1, -2) @ qb)
            if dbias is not None:
                dbias[:, :, qs:qe, ks:ke] = dscores


def _varlen_per_sequence(q) -> bool:
    """Whether varlen windowed attention runs one sequence at a time (CPU: reading cu_seqlens is
    free there) rather than re-padded to max_seqlen (elsewhere: no host sync)."""
    return q.device.type == "cpu"


def _window_slabs(q, k, v, attention_mask, attn_bias, cu_seqlens, max_seqlen):
    """``(slab, index)`` pairs covering the problem in the accumulation dtype: the whole padded
    batch as one slab (index: a slice of the batch dim); varlen on CPU one sequence per slab (a
    free host sync there; index: its token range), else re-padded to ``max_seqlen`` (index: the
    padding mask)."""
    acc = composite.acc_dtype(q.dtype)
    heads_first = lambda t: t.to(acc).transpose(-3, -2)  # noqa: E731  [.., L, H, d] -> [.., H, L, d]
    if cu_seqlens is None:
        seqs = torch.arange(q.shape[0], device=q.device)
        yield _Slab(heads_first(q), heads_first(k), heads_first(v), attention_mask, attn_bias, seqs), slice(None)
        return
    if _varlen_per_sequence(q):
        bounds = cu_seqlens.tolist()
        for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if end > start:
                parts = (heads_first(t[start:end])[None] for t in (q, k, v))
                yield _Slab(*parts, None, None, torch.tensor([b], device=q.device)), slice(start, end)
        return
    padded = [pad_varlen(t, cu_seqlens, max_seqlen) for t in (q, k, v)]
    mask = padded[0][1]
    seqs = torch.arange(mask.shape[0], device=q.device)
    yield _Slab(*(heads_first(t) for t, _ in padded), mask, None, seqs), mask


def _window_attention_fwd(q, k, v, out, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                          dropout_p, seed, softmax_scale, window):
    """Local-window attention into ``out``, block by block (:data:`WINDOW_BLOCK` query rows meet
    only the keys their windows reach), at a cost of seqlen x (block + window) instead of seqlen^2.
    On CPU, blocks without a key mask, bias, dropout or empty rows (unpadded ModernBERT) run aten's
    fused CPU flash attention with the band as an additive mask (SDPA's numerics, as the global
    path); the others run the reference's math and numerics (fp32 / fp64 accumulation, P rounded
    to q's dtype before ``P @ V``, the shared dropout mask drawn per block)."""
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
                do = pad_varlen(dout, cu_seqlens, max_seqlen)[0]
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
