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


# The overload itself: calling the packet (``torch.ops.aten.native_layer_norm_backward``) resolves
# it on every call.
_LN_BWD = torch.ops.aten.native_layer_norm_backward.default


def _worst_ratio(mean, rstd):
    """``max_rows |mean| * rstd`` as a Python float (NaN when a row's statistics are NaN), or None
    while capturing a CUDA graph (the read is a host sync; on a GPU Triton or CUDA normally runs
    LayerNorm anyway). Two ``[rows]`` ops (the product and its ``aminmax``, which makes both ends
    NaN when any element is) and two reads: no ``[rows, hidden]`` work. Statistics of any shape
    (aten's ``[rows, 1]`` as well). (Not ``abs_().max()``: one dispatched op more, 0.4-0.7 us at 16
    and 1024 rows; not ``vector_norm(., inf)``: its CPU kernel took 6 us at 1024 rows where these
    take 3.6, 1 thread.)"""
    if mean.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    if not mean.numel():
        return 0.0
    lo, hi = torch.aminmax(torch.mul(mean, rstd))
    lo, hi = -lo.item(), hi.item()
    return hi if hi >= lo else lo  # NaN: both are, and so is the result


def _rows_above(mean, rstd, threshold):
    """Indices of the ``[rows]`` statistics' rows with ``|mean| * rstd > threshold`` (NaN rows are
    not), or None when there is none."""
    idx = (mean.abs().mul_(rstd) > threshold).nonzero().view(-1)
    return idx if idx.numel() else None


# The forward's :func:`_worst_ratio`, kept on the ``rstd`` it returns so the backward of the same
# statistics reads it instead of recomputing it (a hint, not a requirement: a tensor without it,
# such as one a traced graph made, is measured again). Autograd hands a saved tensor back to the
# backward as the same Python object, attributes included; its version counter forbids changing
# the values in between.
_WORST = "_fastbert_worst_ratio"


def _aten_params(weight, bias, dtype):
    """weight/bias in one dtype aten's CPU kernels accept: x's dtype for fp32/fp64, fp32 for
    fp16/bf16 (aten's mixed-dtype mode). Exact casts of ``[hidden]`` vectors (none when the dtype
    already fits: the common case)."""
    pdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return (weight if weight is None or weight.dtype == pdt else weight.to(pdt),
            bias if bias is None or bias.dtype == pdt else bias.to(pdt))


def _pre_norm_sum(x, residual, x_bias, dropout_p, seed):
    """``h = dropout(x + x_bias) + residual`` as a fresh ``[rows, hidden]`` tensor: fp16/bf16 in
    fp32 rounded once to x's dtype, as the kernels and the reference store h; fp32/fp64 with
    aten's ops in the same order of operations."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return composite.add_dropout_residual(x, residual, x_bias, dropout_p, seed)
    h = x
    if x_bias is not None:
        h = h + (x_bias if x_bias.dtype == x.dtype else x_bias.to(x.dtype))
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
        h = torch.mul(h, keep).mul_(dropout_scale(dropout_p))
    if residual is not None:
        h = h + residual if h is x else h.add_(residual)
    return h


def layer_norm_fwd_functional(x, weight, bias, residual, x_bias, *, eps, dropout_p, seed, fused):
    """:func:`layer_norm_fwd` returning its outputs ``(y, mean, rstd, h)`` instead of writing
    preallocated ones (``h`` None unless ``fused``): aten's functional ``native_layer_norm``
    allocates exactly what it returns, so this saves the ``out=`` call's overhead and, for
    fp16/bf16, three copies. Fresh tensors, aliasing no input and each other. ``fastbert.ops``
    calls it where the backend module has it.

    Rows that are ill-conditioned for aten (:data:`ILL_CONDITIONED`) are recomputed by the
    reference; finding them reads one number per call (see :func:`_worst_ratio`), which rides on
    ``rstd`` to the backward (:data:`_WORST`). Unfused calls take x with any leading dims
    (``(..., hidden)``: y has x's shape, mean / rstd ``[rows]``).
    """
    hidden = x.shape[-1]
    h = _pre_norm_sum(x, residual, x_bias, dropout_p, seed) if fused else x
    w, b = _aten_params(weight, bias, x.dtype)
    y, mean, rstd = torch.native_layer_norm(h, (hidden,), w, b, eps)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean, rstd = mean.view(-1), rstd.view(-1)
    if mean.dtype != stat:
        mean, rstd = mean.to(stat), rstd.to(stat)
    worst = _worst_ratio(mean, rstd)
    if worst is not None:
        if not worst <= ILL_CONDITIONED:  # NaN too: the rows are then looked at one by one
            _recompute_rows(y, h, weight, bias, eps, mean, rstd)
        setattr(rstd, _WORST, worst)
    return y, mean, rstd, (h if fused else None)


def _recompute_rows(y, h, weight, bias, eps, mean, rstd, stats=True):
    """Overwrite the rows of y (and, with ``stats``, of the ``[rows]`` mean / rstd) whose statistics
    say aten's one-pass forward cannot be trusted (``|mean| * rstd >`` :data:`ILL_CONDITIONED`) with
    the reference's two-pass math; mean / rstd of any shape (aten's ``(..., 1)`` as well)."""
    idx = _rows_above(mean.view(-1), rstd.view(-1), ILL_CONDITIONED)
    if idx is not None:
        hidden = h.shape[-1]
        y2 = y.view(-1, hidden)
        y2[idx], m, r = composite.layer_norm_math(h.reshape(-1, hidden)[idx], weight, bias, eps)
        if stats:
            mean[idx], rstd[idx] = m, r


_ATEN_GRAPH_DTYPES = (torch.float32, torch.float64)


def layer_norm_fwd_differentiable(x, weight, bias, residual, x_bias, *, eps, backward):
    """y of an add & norm without dropout, ``LN(x + x_bias + residual)``, through differentiable
    aten calls: the plain torch sequence ``F.layer_norm(x + x_bias + residual, ...)`` (adds, then
    ``native_layer_norm``), x ``(..., hidden)`` fp32 / fp64 with any leading dims, residual like x;
    None where this backend computes the call another way.

    ``backward=True``: ``fastbert.ops``' eager path with gradients runs it under torch's autograd,
    so y carries aten's own backward nodes (``native_layer_norm_backward``, the call
    :func:`layer_norm_bwd_functional` itself makes for such rows, bit for bit; the adds' gradients
    summed over rows for x_bias) with no Python autograd node and nothing saved but what the plain
    sequence saves (h, its statistics, weight and bias). Returned only where that backward is this
    backend's: ``hidden > 2`` and every row well-conditioned for aten's backward (``max |mean| * rstd
    <=`` :data:`BWD_ILL_CONDITIONED`, hence for its forward too; measured from this forward's
    statistics, so a call past it costs the caller a second forward).

    ``backward=False`` (nothing is recorded: the eager forward without gradients): y with the
    ill-conditioned rows recomputed as :func:`layer_norm_fwd_functional` does, without its
    ``[rows]`` statistics (nobody reads them) or their conversions.

    None, without computing anything, for fp16/bf16 x: their pre-norm sum is rounded once from fp32
    (:func:`_pre_norm_sum`), which no aten graph of this form does.
    """
    hidden = x.shape[-1]
    if x.dtype not in _ATEN_GRAPH_DTYPES or (backward and hidden <= 2):
        return None
    h = x if residual is None and x_bias is None else _pre_norm_sum(x, residual, x_bias, 0.0, None)
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y, mean, rstd = torch.native_layer_norm(h, (hidden,), weight, bias, eps)
    worst = _worst_ratio(mean, rstd)
    if backward:
        return y if worst is not None and worst <= BWD_ILL_CONDITIONED else None
    if worst is not None and not worst <= ILL_CONDITIONED:  # NaN too: the rows are looked at
        _recompute_rows(y, h, weight, bias, eps, mean, rstd, stats=False)
    return y


def layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Backend entry point: ``h = dropout(x + x_bias) + residual``, ``y = LN(h)``, written into the
    preallocated outputs (see :func:`layer_norm_fwd_functional`, which computes them)."""
    yy, m, r, hh = layer_norm_fwd_functional(x, weight, bias, residual, x_bias, eps=eps,
                                                dropout_p=dropout_p, seed=seed, fused=h is not None)
    y.copy_(yy)
    mean.copy_(m)
    rstd.copy_(r)
    if h is not None:
        h.copy_(hh)


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
    dxx, dw, db, dres, dxb = layer_norm_bwd_functional(
        dy, h, weight, mean, rstd, need_dweight=dweight is not None, need_dbias=dbias is not None,
        need_dresidual=dresidual is not None, need_dx_bias=dx_bias is not None, dropout_p=dropout_p,
        seed=seed)
    for src, dst in ((dxx, dx), (dw, dweight), (db, dbias), (dres, dresidual), (dxb, dx_bias)):
        if dst is not None:
            dst.copy_(src)


def _aten_form_is_stable(mean, rstd):
    """Whether aten's expanded backward is stable for every row of these statistics: ``max |mean|
    * rstd <=`` :data:`BWD_ILL_CONDITIONED`, from the forward's measure where it rides on ``rstd``
    (:data:`_WORST`), else measured. True while capturing a CUDA graph (nothing can be read); False
    for NaN statistics (the centred form serves every row)."""
    worst = getattr(rstd, _WORST, None)
    if worst is None:
        worst = _worst_ratio(mean, rstd)
    return worst is None or worst <= BWD_ILL_CONDITIONED


def layer_norm_bwd_functional(dy, h, weight, mean, rstd, *, need_dweight, need_dbias, need_dresidual,
                              need_dx_bias, dropout_p, seed):
    """:func:`layer_norm_bwd` returning ``(dx, dweight, dbias, dresidual, dx_bias)`` (None where not
    needed) instead of writing preallocated outputs: no copies out of aten's results. ``dresidual``
    may be the same tensor as ``dx`` (without dropout both are dh): a caller that needs distinct
    outputs (a custom op) clones it. The math and its stability are :func:`layer_norm_bwd`'s."""
    hidden = h.shape[-1]
    stat = mean.dtype  # fp32, fp64 for fp64 h
    if hidden <= 2:  # y is constant in h (+-1 or 0): dh is 0, which aten's expanded form misses
        vec = lambda need: torch.empty(hidden, dtype=stat, device=h.device) if need else None  # noqa: E731
        out = (torch.empty_like(h), vec(need_dweight), vec(need_dbias),
               torch.empty_like(h) if need_dresidual else None, vec(need_dx_bias))
        composite.layer_norm_bwd(dy, h, weight, mean, rstd, *out, dropout_p=dropout_p, seed=seed)
        return out
    w = weight if weight is None or weight.dtype == stat else weight.to(stat)
    # dbias = sum_rows(dy) from aten's own pass over dy (its output mask), not a second one: aten
    # only allocates dbias like its bias argument (never reads it), so w, or without a weight an
    # empty [hidden] vector, stands in for the bias the backward is not given.
    beta = (w if w is not None else torch.empty(hidden, dtype=stat, device=h.device)) if need_dbias else None
    mask = [True, need_dweight, need_dbias]
    # mean / rstd go in as the [rows] vectors they are: aten's CPU backward reads them by row from
    # their data, so no [rows, 1] views are made for it.
    if h.dtype == stat and _aten_form_is_stable(mean, rstd):
        # The common case: no row with |mean| > its spread; aten's form loses nothing there.
        dh, dw, db = _LN_BWD(dy, h, (hidden,), mean, rstd, w, beta, mask)
    else:
        centred = torch.sub(h, mean.view(-1, 1))  # in mean's dtype: fp16 / bf16 h promoted, no copy of h
        dh, dw, db = _LN_BWD(dy.to(stat), centred, (hidden,), torch.zeros_like(mean), rstd, w, beta, mask)
    same = dh.dtype == h.dtype  # fp32 / fp64: dh is already dx and dresidual (no .to() call)
    dres = (dh if same else dh.to(h.dtype)) if need_dresidual else None
    if dropout_p > 0.0:
        keep = rows_keep_mask(seed, dropout_p, h.shape[0], hidden, device=h.device)
        dh = torch.mul(dh, keep).mul_(dropout_scale(dropout_p))
    dx = dres if dres is not None and dropout_p == 0.0 else (dh if same else dh.to(h.dtype))
    dxb = dh.sum(0) if need_dx_bias else None
    return dx, (dw if need_dweight else None), (db if need_dbias else None), dres, dxb
