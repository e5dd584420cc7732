"""Dense attention on the torch backend: SDPA, aten's CPU flash attention per sequence, and the
reference's composite math where dropout needs the shared keep mask (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert.backends import _composite as composite
from fastbert.backends._composite import attention_math, pad_varlen
from fastbert.backends.torch import _masked
from fastbert.backends.torch._masked import _flash_cpu, _flash_cpu_bwd
from fastbert.backends.torch._varlen_dropout import varlen_dropout_bwd, varlen_dropout_fwd
from fastbert.backends.torch._window import (_window_attention_bwd, _window_attention_fwd, _window_bounds,
                                             _window_covers_all)


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


def writes_lse_for(*, device_type, dtype, varlen, dropout_p, has_bias, window=False):
    """Whether :func:`attention_fwd` writes ``lse`` for such a call (``fastbert.ops`` then allocates
    it): padded CPU attention without dropout or bias in fp32/fp16/bf16 runs aten's CPU flash
    attention, whose logsumexp lets backward skip recomputing the forward. (fp64: aten's fp64
    logsumexp would be rounded to the fp32 planes, so fp64 recomputes; a window runs its own blockwise
    path, which writes none.)"""
    return (device_type == "cpu" and not varlen and dropout_p == 0.0 and not has_bias and not window
            and dtype in _FLASH_DTYPES)


_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # where aten's CPU flash logsumexp is kept



def _valid_keys(attention_mask):
    """Per sequence of a bool ``[batch, seqlen_k]`` mask (read on the CPU, free there): ``(n, idx)``
    with ``n`` its number of valid keys and ``idx`` None when they are the prefix ``[0, n)`` (right
    padding: slices are views) or their indices otherwise; or None when every key is valid."""
    counts = attention_mask.sum(1).tolist()
    if all(n == attention_mask.shape[1] for n in counts):
        return None
    out = []
    for b, n in enumerate(counts):
        prefix = n == 0 or bool(attention_mask[b, :n].all())
        out.append((n, None if prefix else attention_mask[b].nonzero().squeeze(1)))
    return out


def _keys_of(t, b, n, idx):
    """Sequence ``b``'s valid keys of heads-first ``t`` ``[B, H, Lk, d]``: ``[1, H, n, d]``."""
    return t[b:b + 1, :, :n] if idx is None else t[b:b + 1].index_select(2, idx)


def _flash_padded(qh, kh, vh, attention_mask, softmax_scale, out, lse):
    """aten's CPU flash attention writing ``out`` ``[B, Lq, H, d]`` and ``lse``'s two planes (m =
    logsumexp, log l = 0; empty rows +inf, 0): grouped on in-place key spans (see
    ``_masked``), else per sequence on its exact valid keys (a masked key not finite)."""
    lse[1].zero_()
    p = (_whole(qh, kh.transpose(1, 2)) if attention_mask is None
         else _masked.plan(attention_mask, kh.transpose(1, 2), vh.transpose(1, 2)))
    if p is not None:
        _masked.forward(qh, kh, vh, p, softmax_scale, out, lse[0])
        return
    for b, (n, idx) in enumerate(_valid_keys(attention_mask)):
        if n == 0:  # every key masked: empty rows
            out[b].zero_()
            lse[0, b].fill_(float("inf"))
            continue
        o, l = _flash_cpu(qh[b:b + 1], _keys_of(kh, b, n, idx), _keys_of(vh, b, n, idx), 0.0, False,
                          scale=softmax_scale)
        out[b].copy_(o[0].transpose(0, 1))
        lse[0, b].copy_(l[0])


def _flash_padded_bwd(dout, q, k, v, out, lse, dq, dk, dv, attention_mask, softmax_scale):
    """Backward of :func:`_flash_padded` from its saved ``out`` and ``lse``: aten's CPU flash
    backward on the same plan (grouped key spans, else per sequence on its exact valid keys; no
    recomputed forward); masked keys get exact zero dK and dV, empty rows zero gradients."""
    qh, kh, vh, doh, oh = (t.transpose(1, 2) for t in (q, k, v, dout, out))  # [B, H, L, d] views
    p = _whole(q, k) if attention_mask is None else _masked.plan(attention_mask, k, v)
    if p is not None:
        _masked.backward(doh, qh, kh, vh, oh, lse[0], p, softmax_scale, (dq, dk, dv))
        return
    for b, (n, idx) in enumerate(_valid_keys(attention_mask)):
        if n < k.shape[1]:
            dk[b].zero_()
            dv[b].zero_()
        if n == 0:
            dq[b].zero_()
            continue
        gq, gk, gv = _flash_cpu_bwd(doh[b:b + 1], qh[b:b + 1], _keys_of(kh, b, n, idx),
                                    _keys_of(vh, b, n, idx), oh[b:b + 1], lse[0, b:b + 1], 0.0, False,
                                    scale=softmax_scale)
        dq[b].copy_(gq[0].transpose(0, 1))
        if idx is None:
            dk[b, :n].copy_(gk[0].transpose(0, 1))
            dv[b, :n].copy_(gv[0].transpose(0, 1))
        else:
            dk[b].index_copy_(0, idx, gk[0].transpose(0, 1))
            dv[b].index_copy_(0, idx, gv[0].transpose(0, 1))


def _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out, lse=None):
    """SDPA on ``[batch, seqlen, num_heads, head_dim]`` into ``out``, empty rows returning zeros.

    Keys masked by ``attention_mask`` have no influence whatever K and V hold there (NaN, Inf).
    With a non-empty ``lse`` (see :func:`writes_lse_for`) aten's CPU flash attention runs on the
    plan of ``_masked`` (in-place key spans, see :func:`_flash_padded`) and writes it too. Else, on
    CPU each sequence runs on its valid keys only (a view when they are a prefix, a gather of that
    sequence's keys otherwise; reading the mask is free there); elsewhere the masked K and V rows
    are replaced by zeros. The bias is read in its compact shape (see :func:`_compact_bias`).
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d] views
    if lse is not None and lse.numel():
        return _flash_padded(qh, kh, vh, attention_mask, softmax_scale, out, lse)
    bias = _compact_bias(attn_bias, q)
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
        q, mask = pad_varlen(q, cu_seqlens, max_seqlen)
        k, _ = pad_varlen(k, cu_seqlens, max_seqlen)
        v, _ = pad_varlen(v, cu_seqlens, max_seqlen)
    if dropout_p > 0.0:
        out, _ = attention_math(q, k, v, attention_mask=mask, attn_bias=attn_bias,
                                dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)
    else:
        out = _sdpa(q, k, v, mask, attn_bias, softmax_scale, torch.empty_like(q))
    return out[mask] if cu_seqlens is not None else out


def attention_fwd_functional(q, k, v, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
                             softmax_scale, allow_tf32=False, deterministic=False, window=None):
    """:func:`attention_fwd` returning ``(out, lse)`` (fresh tensors) for the calls that have a
    functional form, else None (``fastbert.ops`` then allocates and calls :func:`attention_fwd`):
    padded CPU attention without a bias, dropout or window, where :func:`writes_lse_for` holds, with
    no mask or a mask the grouped in-place plan takes (``_masked``: masked keys inside the spans
    finite). aten's CPU flash attention already lays its output out as ``[B, L, H, d]``, so where
    one call covers the batch ``out`` is a view of it (no copy). ``lse``, which only
    :func:`attention_bwd_functional` reads, is flash's logsumexp: without a mask its own ``[B, H, L]``
    tensor; with a mask one plane ``[1, B, H, L]`` (the second plane, log l, is 0: flash's logsumexp
    is exact; empty rows +inf), which also marks the calls whose plan passed its K/V check. Nothing
    rides on it as a Python attribute (a saved-tensor hook that copies it loses nothing). Called on
    the eager path only (the custom op keeps fixed output shapes)."""
    if (attn_bias is not None or cu_seqlens is not None or dropout_p != 0.0
            or window is not None or q.dtype not in _FLASH_DTYPES or not q.is_cpu):
        return None  # (the calls writes_lse_for refuses)
    if attention_mask is None:  # one call over every sequence and key: no plan, no slices
        o, lse = _flash_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                            scale=softmax_scale)
        return o.transpose(1, 2), lse  # aten lays o out as [B, L, H, d]: the transpose is contiguous
    p = _masked.plan(attention_mask, k, v)
    if p is None:
        return None
    out, lse = _masked.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p, softmax_scale)
    return out, lse.unsqueeze(0)


def attention_fwd_differentiable(q, k, v, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
                                 softmax_scale, backward, allow_tf32=False, deterministic=False, window=None):
    """``out`` of :func:`attention_fwd_functional` through differentiable aten calls, or None:
    ``fastbert.ops``' eager path with gradients runs it under torch's autograd, recording aten's own
    graph (its flash node and transposes, what plain ``F.scaled_dot_product_attention`` records; no
    Python autograd node, no Python backward). With gradients it is one flash call: no mask, or a
    mask whose plan (``_masked``) is one call over the batch, on the keys ``[0, span)`` (a slice:
    keys beyond it get zero gradients from its backward) with the additive 0 / ``-inf`` mask (masked
    keys inside the span get exact zero dK, dV: ``P = 0``, as in :func:`_masked.backward`); the
    plan's K/V check runs first, recording nothing. A plan of several groups returns None there
    (their backward through aten's slices would fill a full-size zero gradient per group): the caller
    then runs fastbert's own node. Without gradients (the eager no-grad forward) it also runs such
    plans, on the forward's cost model (``_masked.FWD_COPY_COST``: one output to assemble), and
    returns the assembled output. ``backward``: whether the caller records gradients (ops decides;
    False for the eager forward without gradients, also when grad mode is on but no input needs one). None also for a non-finite masked key, a bias, dropout, a window,
    fp64, varlen. A second derivative fails as aten's flash backward has none (as plain SDPA's)."""
    if (attn_bias is not None or cu_seqlens is not None or dropout_p != 0.0
            or window is not None or q.dtype not in _FLASH_DTYPES or not q.is_cpu):
        return None
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if attention_mask is None:
        o, _ = _flash_cpu(qh, kh, vh, 0.0, False, scale=softmax_scale)
        return o.transpose(1, 2)  # aten lays o out as [B, L, H, d]: the transpose is contiguous
    p, check = _masked.mask_plan(attention_mask, k.dtype, _masked.COPY_COST if backward else _masked.FWD_COPY_COST)
    one = p.one_call(q.shape[0])
    if backward and not one:
        return None
    if check is not None:
        if backward:
            torch._C._set_grad_enabled(False)  # the check reads k, v: record nothing for it
            try:
                ok = _masked.masked_finite(k, v, check)
            finally:
                torch._C._set_grad_enabled(True)
        else:
            ok = _masked.masked_finite(k, v, check)
        if not ok:
            return None
    if not one:
        return _masked.forward(qh, kh, vh, p, softmax_scale, with_lse=False)[0]
    g = p.groups[0]
    if g.span < kh.shape[2]:
        kh, vh = kh[:, :, :g.span], vh[:, :, :g.span]
    o, _ = _flash_cpu(qh, kh, vh, 0.0, False, attn_mask=g.bias, scale=softmax_scale)
    return o.transpose(1, 2)


def _whole(q, k):
    """The plan of an unmasked call: one group, every key."""
    return _masked.Plan([_masked.Group(0, q.shape[0], k.shape[1], None)], [])


def attention_bwd_functional(dout, q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                             dropout_p, seed, softmax_scale, need_dbias, allow_tf32=False, deterministic=False,
                             window=None):
    """Backward of :func:`attention_fwd_functional`: ``(dq, dk, dv)`` from aten's CPU flash backward
    on the same plan, fresh tensors in ``[B, L, H, d]`` (views of aten's gradients where one call
    covers every sequence and key; masked keys get exact zeros, see ``_masked.Plan``), or None for any call the
    functional forward did not take (its ``lse``, ``[B, H, L]`` or one plane, marks them).
    ``lse`` must be the forward's of this call, and q, k, v, the mask its inputs (autograd's saved
    tensors: unmodified, or a saved-tensor hook's copies of them). A one-plane ``lse`` then means
    the forward's plan passed its K/V check, so the plan is the mask's alone (``_masked.mask_plan``,
    the same function and cost as the forward's: the same spans; remembered, not rebuilt), without
    reading k and v again."""
    if (attn_bias is not None or cu_seqlens is not None or dropout_p != 0.0 or window is not None
            or need_dbias):
        return None
    if attention_mask is None and lse.dim() == 3:  # the forward's one unmasked call (its [B, H, L] lse)
        heads = (t.transpose(1, 2) for t in (dout, q, k, v, out))
        grads = _flash_cpu_bwd(*heads, lse, 0.0, False, scale=softmax_scale)
        grads = [g.transpose(1, 2) for g in grads]
        return tuple(g if g.is_contiguous() else g.contiguous() for g in grads)
    if lse.dim() != 4 or lse.shape[0] != 1 or attention_mask is None:
        return None
    p, _ = _masked.mask_plan(attention_mask, k.dtype)
    return _masked.backward(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            out.transpose(1, 2), lse[0], p, softmax_scale)


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False, window=None):
    """Backend entry point (see ``fastbert.backends``); writes ``lse`` where
    :func:`writes_lse_for` says so (``lse`` is then non-empty), else leaves it unwritten."""
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
        if cu_seqlens is not None and q.device.type == "cpu" and attn_bias is None:  # dropout: no padding
            return varlen_dropout_fwd(q, k, v, out, cu_seqlens, dropout_p=dropout_p, seed=seed,
                                      softmax_scale=softmax_scale)
        if cu_seqlens is None and dropout_p == 0.0:
            return _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out, lse)
        out.copy_(_attention(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                             cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p,
                             seed=seed, softmax_scale=softmax_scale))


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False, window=None):
    """Backend entry point: aten's CPU flash backward where the forward ran it (padded: from the
    forward's saved ``lse`` on the same plan, see :func:`writes_lse_for`; varlen: per run of
    equal-length sequences); otherwise the reference's composite backward (recompute P with matmuls)."""
    if window is not None and _window_covers_all(window, *_window_bounds(q, k, cu_seqlens, max_seqlen)):
        window = None  # as forward
    if window is not None:
        return _window_attention_bwd(dout, q, k, v, dq, dk, dv, dbias, attention_mask=attention_mask,
                                     attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                     dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                                     window=window)
    if lse.numel() and cu_seqlens is None:
        return _flash_padded_bwd(dout, q, k, v, out, lse, dq, dk, dv, attention_mask, softmax_scale)
    if (cu_seqlens is not None and q.device.type == "cpu" and dropout_p == 0.0
            and attn_bias is None):
        return _sdpa_per_sequence_bwd(dout, q, k, v, dq, dk, dv, cu_seqlens, softmax_scale)
    if cu_seqlens is not None and q.device.type == "cpu" and attn_bias is None:  # dropout: no padding
        return varlen_dropout_bwd(dout, q, k, v, out, dq, dk, dv, cu_seqlens, dropout_p=dropout_p, seed=seed,
                                  softmax_scale=softmax_scale)
    composite.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, attention_mask=attention_mask,
                            attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale)
