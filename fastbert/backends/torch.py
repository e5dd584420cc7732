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
from fastbert.backends._philox import dropout_scale, rows_keep_mask
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
    Consecutive sequences of equal length run as one batched call (a ``(n, len, H, d)`` view of
    their rows): fewer calls and parallel regions, more work per call (length-sorted batches,
    as sentence-transformers makes, repeat lengths often). Reading ``cu_seqlens`` is a host
    sync, free on CPU, so this path is CPU-only.
    """
    heads = q.shape[1:]
    for start, n, length in _equal_length_runs(cu_seqlens):
        qs, ks, vs = (t[start:start + n * length].view((n, length) + heads).transpose(1, 2)
                      for t in (q, k, v))  # [n, H, len, d] views
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)  # [n, H, len, d]
        out[start:start + n * length].view((n, length) + heads).copy_(o.transpose(1, 2))


def _equal_length_runs(cu_seqlens):
    """``(first row, number of sequences, length)`` of each run of consecutive non-empty sequences
    of equal length in ``cu_seqlens`` (one host read); empty sequences have no rows and are skipped."""
    bounds = cu_seqlens.tolist()
    runs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, length])
    return runs


def _sdpa_per_sequence_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, softmax_scale):
    """Backward of :func:`_sdpa_per_sequence`: recompute each run's SDPA and differentiate it
    (aten's CPU flash backward), writing the slices of dq/dk/dv. No padded rows, as in forward;
    the same runs of equal-length sequences as one batched call."""
    heads = q.shape[1:]
    for start, n, length in _equal_length_runs(cu_seqlens):
        rows = slice(start, start + n * length)
        qs, ks, vs, do = (t[rows].view((n, length) + heads).transpose(1, 2) for t in (q, k, v, dout))
        # Explicit aten forward + backward: inside a custom op autograd dispatch is excluded, so
        # SDPA would record no graph even under torch.enable_grad().
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qs, ks, vs, 0.0, False, scale=softmax_scale)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, qs, ks, vs, o, lse, 0.0, False, scale=softmax_scale)
        for g, dst in zip(grads, (dq, dk, dv)):
            dst[rows].view((n, length) + heads).copy_(g.transpose(1, 2))


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
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False):
    """Backend entry point (see ``fastbert.backends``); leaves ``lse`` unwritten."""
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
                  deterministic=False):
    """Backend entry point: per sequence through SDPA's CPU backward where the forward ran per
    sequence; otherwise the reference's composite backward (recompute P with matmuls)."""
    if (cu_seqlens is not None and q.device.type == "cpu" and dropout_p == 0.0
            and attn_bias is None):
        return _sdpa_per_sequence_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, softmax_scale)
    reference.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, attention_mask=attention_mask,
                            attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)


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
