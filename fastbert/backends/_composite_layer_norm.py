"""The composite LayerNorm math with BERT's add & norm, ``y = LN(dropout(x + x_bias) + residual)``
(Ba et al. 2016): plain PyTorch that reads like the math, fp64-capable; shared by the
``reference`` and ``torch`` backends (see :mod:`._composite`)."""

from __future__ import annotations

import torch

from fastbert.backends._composite_common import acc_dtype
from fastbert.backends._philox import dropout_scale, rows_keep_mask


def add_dropout_residual(x, residual=None, x_bias=None, dropout_p=0.0, seed=None):
    """``h = dropout(x + x_bias) + residual`` on ``[rows, hidden]`` (the pre-norm sum), computed in
    fp32 (fp64 for fp64 x) and rounded once to x's dtype, as the kernels store it; the scale is
    the multiplier ``1 / (1 - p)`` they use."""
    if x_bias is None and residual is None and dropout_p == 0.0:
        return x
    h = x.to(acc_dtype(x.dtype))
    if x_bias is not None:
        h = h + x_bias.to(h.dtype)
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
        h = h * keep * dropout_scale(dropout_p)
    if residual is not None:
        h = h + residual.to(h.dtype)
    return h.to(x.dtype)


def layer_norm_math(h, weight, bias, eps):
    """LayerNorm over the last dim (Ba et al. 2016): ``(h - mean) / sqrt(var + eps) * w + b``.

    Statistics in fp32 (fp64 for fp64 input) with the two-pass variance ``mean((h - mean)^2)``;
    returns ``(y, mean, rstd)`` with y in h's dtype and mean/rstd ``[rows]`` in the statistics dtype.
    """
    stat_dtype = acc_dtype(h.dtype)
    hf = h.to(stat_dtype)
    mean = hf.mean(dim=-1, keepdim=True)
    var = ((hf - mean) ** 2).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (hf - mean) * rstd
    if weight is not None:
        y = y * weight.to(stat_dtype)
    if bias is not None:
        y = y + bias.to(stat_dtype)
    return y.to(h.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Backend entry point: writes y, mean, rstd and (when fused) the pre-norm sum h."""
    hh = add_dropout_residual(x, residual, x_bias, dropout_p, seed)
    yy, m, r = layer_norm_math(hh, weight, bias, eps)
    y.copy_(yy)
    mean.copy_(m)
    rstd.copy_(r)
    if h is not None:
        h.copy_(hh)


def layer_norm_dh(dy, h, weight, mean, rstd):
    """``(dh, xhat, dy)`` in the statistics dtype for rows of h with their saved mean / rstd:
    ``dh = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``xhat = (h - mean) * rstd``,
    ``g = dy * weight``. xhat is formed before it multiplies anything, so a row with a large mean
    and a tiny variance loses nothing to cancellation."""
    stat_dtype = acc_dtype(h.dtype)
    hf, dyf = h.to(stat_dtype), dy.to(stat_dtype)
    r = rstd.to(stat_dtype)[:, None]
    xhat = (hf - mean.to(stat_dtype)[:, None]) * r
    g = dyf if weight is None else dyf * weight.to(stat_dtype)
    dh = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dh, xhat, dyf


def layer_norm_bwd(dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p,
                   seed):
    """Backend entry point.

    With xhat = (h - mean) * rstd and g = dy * weight (per row, n = hidden):
      dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
      dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)
      dresidual = dh, dx = dh * keep * dropout_scale(p), dx_bias = sum_rows(dx)
    """
    dh, xhat, dyf = layer_norm_dh(dy, h, weight, mean, rstd)
    if dweight is not None:
        dweight.copy_((dyf * xhat).sum(0))
    if dbias is not None:
        dbias.copy_(dyf.sum(0))
    if dresidual is not None:
        dresidual.copy_(dh)
    dxf = dh
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, h.shape[0], h.shape[1], device=h.device)
        dxf = dh * keep * dropout_scale(dropout_p)
    dx.copy_(dxf)
    if dx_bias is not None:
        dx_bias.copy_(dxf.sum(0))
