"""LayerNorm (add & norm) on the torch backend: aten's ``native_layer_norm`` with the fused
bias + dropout + residual prologue, ill-conditioned rows recomputed by the reference's two-pass math."""

from __future__ import annotations

import torch

from fastbert.backends import _composite as composite
from fastbert.backends._philox import dropout_scale, rows_keep_mask


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
    """Indices of the rows aten's forward cannot be trusted with, or None (the common case: one
    [rows] product and its max, no [rows, hidden] work; the nonzero only when some row exceeds
    ``threshold``). Skipped while capturing a CUDA graph (the max is a host sync); on a GPU
    Triton or CUDA normally runs LayerNorm anyway."""
    if mean.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    ratio = mean.abs().mul_(rstd)
    top = float(ratio.max()) if ratio.numel() else 0.0
    if not (top > threshold or top != top):  # NaN propagates through max: then look row by row
        return None
    idx = (ratio > threshold).nonzero().view(-1)
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
        h.copy_(composite.add_dropout_residual(x, residual, x_bias, dropout_p, seed))
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
        y[idx], mean[idx], rstd[idx] = composite.layer_norm_math(hh[idx], weight, bias, eps)


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
        return composite.layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias,
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
