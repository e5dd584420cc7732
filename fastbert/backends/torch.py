"""The torch composite backend: ``scaled_dot_product_attention``, ``native_layer_norm``, GELU math.

The fast default on CPU and the fallback everywhere. Varlen attention runs one sequence at a time
on CPU (no padding at all; reading ``cu_seqlens`` is a free host sync there) and is re-padded only
inside attention elsewhere. Outputs are computed into the preallocated tensors (``out=``) where
aten allows it, saving the copy a temporary would cost. With dropout, attention needs the shared
Philox keep mask, which SDPA cannot take, so it runs the reference's composite math instead, and
backward is that composite's backward (this backend writes no ``lse``).

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


def _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out=None):
    """SDPA on ``[batch, seqlen, num_heads, head_dim]`` with empty rows returning zeros (into ``out``
    when given, else a new tensor).

    A row with no key would give NaN (or a backend-dependent value) and NaN gradients, so its mask
    is opened to every key and its output zeroed afterwards: the row then passes zero gradients.
    """
    mask = None  # bool [B, 1|H, 1|Lq, Lk]: True = attend
    if attention_mask is not None:
        mask = attention_mask[:, None, None, :]
    if attn_bias is not None:  # a -inf bias excludes a key like the padding mask (no host sync)
        finite = ~torch.isneginf(attn_bias)
        mask = finite if mask is None else mask & finite
    has_key = None
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)  # [B, *, *, 1]
        mask = mask | ~has_key
    attn = mask
    if attn_bias is not None:
        bias = attn_bias.to(q.dtype)
        attn = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=attn, scale=softmax_scale)  # [B, H, Lq, d]
    if out is not None:  # write [B, Lq, H, d] straight into the preallocated output
        if has_key is None:
            return out.copy_(o.transpose(1, 2))
        return torch.where(has_key.transpose(1, 2), o.transpose(1, 2), o.new_zeros(()), out=out)
    if has_key is not None:
        o = torch.where(has_key, o, 0.0)
    return o.transpose(1, 2)


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
        out = _sdpa(q, k, v, mask, attn_bias, softmax_scale)
    return out[mask] if cu_seqlens is not None else out


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False):
    """Backend entry point (see ``fastbert.backends``); leaves ``lse`` unwritten."""
    with torch.no_grad():
        if (cu_seqlens is not None and q.device.type == "cpu" and dropout_p == 0.0
                and attn_bias is None):
            return _sdpa_per_sequence(q, k, v, out, cu_seqlens, softmax_scale)
        if cu_seqlens is None and dropout_p == 0.0:
            return _sdpa(q, k, v, attention_mask, attn_bias, softmax_scale, out=out)
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


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Backend entry point: ``h = dropout(x + x_bias) + residual``, ``y = LN(h)``.

    Computes straight into the preallocated ``h`` (and, for fp32/fp64, ``y``/``mean``/``rstd`` via
    ``native_layer_norm.out``): no temporaries and no copies, in the same order of operations.
    """
    hh = x
    if h is not None:
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
    if mean.dtype == x.dtype:  # fp32/fp64: aten's statistics already have the contract's dtype
        torch.ops.aten.native_layer_norm.out(hh, (x.shape[-1],), weight, bias, eps, out0=y,
                                             out1=mean.view(-1, 1), out2=rstd.view(-1, 1))
        return
    yy, m, r = torch.native_layer_norm(hh, (x.shape[-1],), weight, bias, eps)
    y.copy_(yy)
    mean.copy_(m.view(-1))
    rstd.copy_(r.view(-1))


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
                   seed):
    """Backend entry point via ``aten.native_layer_norm_backward``."""
    hidden = h.shape[-1]
    stat = h.dtype if weight is None else torch.promote_types(h.dtype, weight.dtype)
    stat = torch.float32 if stat in (torch.float16, torch.bfloat16) else stat
    # fp32/fp64 with weight in h's dtype: aten's dweight already accumulates in that dtype, so it
    # comes from the same pass as dh instead of three [rows, hidden] temporaries here.
    aten_dweight = dweight is not None and h.dtype == stat and weight.dtype == stat
    dh, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dy, h, (hidden,), mean.view(-1, 1).to(stat), rstd.view(-1, 1).to(stat), weight, None,
        [True, aten_dweight, False])
    if aten_dweight:
        dweight.copy_(dw)
    elif dweight is not None:  # accumulated in fp32 (aten rounds xhat to h's dtype for fp16/bf16)
        xhat = (h.to(stat) - mean.view(-1, 1).to(stat)) * rstd.view(-1, 1).to(stat)
        dweight.copy_((dy.to(stat) * xhat).sum(0))
    if dbias is not None:
        dbias.copy_(dy.sum(0, dtype=stat))
    if dresidual is not None:
        dresidual.copy_(dh)
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, h.shape[0], hidden, device=h.device)
        dh = torch.mul(dh, keep, out=dx).mul_(dropout_scale(dropout_p))
    else:
        dx.copy_(dh)
    if dx_bias is not None:
        dx_bias.copy_(dh.sum(0, dtype=stat))


# ----------------------------------------------------------------------------------------------
# GELU with bias
# ----------------------------------------------------------------------------------------------


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(x + bias)``.

    fp32/fp64: ``F.gelu``. fp16/bf16: the reference's erfc / sigmoid form in fp32, because
    ``F.gelu``'s ``1 + erf`` (``1 + tanh``) cancels for x < -4 and lands whole units in the last
    place of fp16/bf16 away there; in fp32 that error stays below eps * |x|.
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
