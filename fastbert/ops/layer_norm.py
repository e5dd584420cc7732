"""LayerNorm with BERT's add & norm fusion: validation, dispatch, custom ops and autograd."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastbert.ops._common import (EagerOp, acc_dtype, as_dtype, as_float, autocast_dtype, check_dropout_p,
                                  check_tensor, check_vector, check_x, draw_seed, new_empty, no_autocast,
                                  no_double_backward)
from fastbert.ops._dispatch import backend_module, resolve_call

_any_autocast = torch._C._is_any_autocast_enabled


def _layer_norm_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], x_bias: Optional[Tensor], seed: Optional[Tensor],
                    eps: float, dropout_p: float, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd, h = _layer_norm_fwd_run(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend)
    return y, mean, rstd, (x.new_empty((0,)) if h is None else h)  # a custom op returns tensors only


def _layer_norm_fwd_run(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend):
    """``(y, mean, rstd, h)``, h None when not fused (the eager path's forward: no placeholder)."""
    rows = x.shape[0]
    fused = residual is not None or x_bias is not None or dropout_p > 0.0
    mod = backend_module(backend, "layer_norm")
    functional = getattr(mod, "layer_norm_fwd_functional", None)
    if functional is not None and x.numel():
        # The backend allocates what it returns (fresh tensors): no out= buffers to fill and copy.
        with no_autocast(x):
            y, mean, rstd, h = functional(x, weight, bias, residual, x_bias, eps=eps, dropout_p=dropout_p,
                                          seed=seed, fused=fused)
        return y, mean, rstd, (h if fused else None)
    y = new_empty(x.shape, x.dtype, x.device)
    mean = new_empty((rows,), acc_dtype(x), x.device)
    rstd = new_empty((rows,), acc_dtype(x), x.device)
    h = new_empty(x.shape, x.dtype, x.device) if fused else None
    if x.numel():
        with no_autocast(x):
            mod.layer_norm_fwd(x, weight, bias, residual, x_bias, y, mean, rstd, h, eps=eps,
                               dropout_p=dropout_p, seed=seed)
    return y, mean, rstd, h


_layer_norm_fwd = torch.library.custom_op("fastbert::layer_norm_fwd", mutates_args=())(_layer_norm_fwd_impl)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend):
    fused = residual is not None or x_bias is not None or dropout_p > 0.0
    rows = x.shape[0]
    return (torch.empty_like(x), x.new_empty((rows,), dtype=acc_dtype(x)),
            x.new_empty((rows,), dtype=acc_dtype(x)), x.new_empty(x.shape if fused else (0,)))


def _layer_norm_bwd_impl(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                    seed: Optional[Tensor], dropout_p: float, need_dweight: bool, need_dbias: bool,
                    need_dresidual: bool, need_dx_bias: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _layer_norm_bwd_run(dy, h, weight, mean, rstd, seed, dropout_p, need_dweight, need_dbias,
                                need_dresidual, need_dx_bias, backend)
    dx, dres = grads[0], grads[3]
    if dres is dx and dx is not None:  # a custom op's outputs may not alias each other
        dres = dres.clone()
    # ... and every gradient not asked for is a fresh empty tensor
    return (dx,) + tuple(h.new_empty((0,)) if t is None else t for t in (grads[1], grads[2], dres, grads[4]))


def _layer_norm_bwd_run(dy, h, weight, mean, rstd, seed, dropout_p, need_dweight, need_dbias, need_dresidual,
                        need_dx_bias, backend):
    """``(dx, dweight, dbias, dresidual, dx_bias)``, None where not needed; dresidual may be dx
    (the eager path's backward returns it as it is: autograd handles a gradient shared by two
    inputs, as it does for ``x + residual``)."""
    mod = backend_module(backend, "layer_norm")
    functional = getattr(mod, "layer_norm_bwd_functional", None)
    if functional is not None and h.numel():
        with no_autocast(h):
            return functional(dy.contiguous(), h, weight, mean, rstd, need_dweight=need_dweight,
                              need_dbias=need_dbias, need_dresidual=need_dresidual, need_dx_bias=need_dx_bias,
                              dropout_p=dropout_p, seed=seed)
    hidden = h.shape[-1]
    dev = h.device
    dx = new_empty(h.shape, h.dtype, dev)
    acc = acc_dtype(h)
    dw = new_empty((hidden,), acc, dev) if need_dweight else None
    db = new_empty((hidden,), acc, dev) if need_dbias else None
    dres = new_empty(h.shape, h.dtype, dev) if need_dresidual else None
    dxb = new_empty((hidden,), acc, dev) if need_dx_bias else None
    if h.numel():
        with no_autocast(h):
            mod.layer_norm_bwd(dy.contiguous(), h, weight, mean, rstd, dx, dw, db, dres, dxb,
                               dropout_p=dropout_p, seed=seed)
    else:
        for t in (dx, dw, db, dres, dxb):
            if t is not None:
                t.zero_()
    return dx, dw, db, dres, dxb


_layer_norm_bwd = torch.library.custom_op("fastbert::layer_norm_bwd", mutates_args=())(_layer_norm_bwd_impl)
no_double_backward(_layer_norm_bwd, "layer_norm")


@_layer_norm_bwd.register_fake
def _(dy, h, weight, mean, rstd, seed, dropout_p, need_dweight, need_dbias, need_dresidual,
      need_dx_bias, backend):
    hidden = h.shape[-1]
    vec = lambda need: h.new_empty((hidden,) if need else (0,), dtype=acc_dtype(h))  # noqa: E731
    return (torch.empty_like(h), vec(need_dweight), vec(need_dbias),
            torch.empty_like(h) if need_dresidual else h.new_empty((0,)), vec(need_dx_bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend = inputs
    y, mean, rstd, h = output
    fused = residual is not None or x_bias is not None or dropout_p > 0.0
    ctx.save_for_backward(h if fused else x, weight, mean, rstd, seed)
    # one attribute: (dropout_p, backend, dtype of weight, bias, x_bias or None, has residual)
    ctx.args = (dropout_p, backend, None if weight is None else weight.dtype, None if bias is None else bias.dtype,
                None if x_bias is None else x_bias.dtype, residual is not None)


def _backward(ctx, dy, dmean, drstd, dh, bwd=None):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    dropout_p, backend, w_dtype, b_dtype, xb_dtype, has_res = ctx.args
    nig = ctx.needs_input_grad
    nw, nb = w_dtype is not None and nig[1], b_dtype is not None and nig[2]
    nres, nxb = has_res and nig[3], xb_dtype is not None and nig[4]
    dx, dw, db, dres, dxb = (bwd or _layer_norm_bwd)(dy, h, weight, mean, rstd, seed, dropout_p, nw, nb, nres, nxb,
                                                     backend)
    # Parameter gradients accumulate in fp32 and take their parameter's dtype.
    return (dx, as_dtype(dw, w_dtype) if nw else None, as_dtype(db, b_dtype) if nb else None,
            dres if nres else None, as_dtype(dxb, xb_dtype) if nxb else None, None, None, None, None)


def _differentiable(x, weight, bias, residual, x_bias, eps, backend, backward):
    """y from the backend's ``layer_norm_fwd_differentiable`` (None where it has none, or none for
    the call): on the torch backend, fp32/fp64, the plain ``F.layer_norm(x + x_bias + residual)``."""
    fn = getattr(backend_module(backend, "layer_norm"), "layer_norm_fwd_differentiable", None)
    if fn is None or not x.numel():
        return None
    if _any_autocast():  # then the backend runs with autocast off; else no context to enter and leave
        with no_autocast(x):
            return fn(x, weight, bias, residual, x_bias, eps=eps, backward=backward)
    return fn(x, weight, bias, residual, x_bias, eps=eps, backward=backward)


def _native(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend):
    """EagerOp's ``native`` (with gradients): aten's own graph of the call without dropout, or None
    (then fastbert's node). With dropout fastbert's node stays: it saves the seed, where aten's
    graph would keep a ``[rows, hidden]`` keep mask for backward."""
    if dropout_p > 0.0:
        return None
    y = _differentiable(x, weight, bias, residual, x_bias, eps, backend, True)
    return None if y is None else (y,)


def _no_grad(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend):
    """EagerOp's ``no_grad_impl``: the differentiable forward where the backend has it for the call
    (y alone: no statistics, no pre-norm sum kept for a backward that will not run), else the
    custom op's forward."""
    if dropout_p == 0.0:
        y = _differentiable(x, weight, bias, residual, x_bias, eps, backend, False)
        if y is not None:
            return (y,)
    return _layer_norm_fwd_run(x, weight, bias, residual, x_bias, seed, eps, dropout_p, backend)


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
_eager = EagerOp(_layer_norm_fwd, _layer_norm_fwd_run, _setup_context, _backward, _layer_norm_bwd,
                 _layer_norm_bwd_run, stats=True, flat=(0, 3), native=_native, no_grad_impl=_no_grad)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
               eps: float = 1e-5, residual: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
               dropout_p: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """BERT's add & norm: ``y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias``.

    LayerNorm over the last dim (Ba et al. 2016, eqs. 3-4): ``(h - mean) / sqrt(var + eps)`` with
    statistics in fp32 and the stable two-pass variance. An all-zero row normalises to zeros, so
    it returns ``bias`` (for eps > 0; with ``eps = 0`` a constant row is 0 / 0 = NaN on every
    backend, as in torch). Empty in (no rows, or hidden 0), empty out. With gradients, an eager
    fp32/fp64 call without dropout on the torch backend records the plain torch sequence's graph
    (``F.layer_norm(x + x_bias + residual)``: aten's backward, h and its statistics kept for it)
    where every row is well-conditioned for aten's backward, fastbert's own node otherwise (and
    with dropout, where it saves the seed rather than a mask).

    Args:
        x: ``(..., hidden)``; fp16, bf16, fp32 or fp64; any strides.
        weight, bias: ``(hidden,)`` or None; each x's dtype or fp32, independently (fp32
            parameters with fp16/bf16 x are accepted; y takes x's dtype); any strides (a strided or
            expanded view is copied once here, so every backend reads a contiguous vector).
        eps: added to the variance (models pass their ``layer_norm_eps``); finite and >= 0 (the
            rule for every backend; torch's ``F.layer_norm`` accepts 0 too).
        residual: x's shape and dtype, added after dropout (the sub-layer input in BERT).
        x_bias: ``(hidden,)``, x's dtype or fp32, added to x before dropout (the bias of the
            preceding dense layer, fused here).
        dropout_p: dropout on ``x + x_bias``, ``0 <= dropout_p < 1``, rounded to a multiple of
            ``2**-16`` and scaled by ``1 / (1 - p rounded)`` (shared Philox scheme v2,
            ``fastbert.backends._philox``, keyed by (row, column) of the flattened
            ``(rows, hidden)`` view).
        backend: force a backend, else ``FASTBERT_BACKEND``, else automatic.

    Returns:
        y with x's shape and dtype.

    Raises:
        TypeError / ValueError: naming the argument, expected and actual value (ndim, hidden size,
            dtype, device, dropout_p, eps). RuntimeError: a forced backend cannot run the call.
    """
    check_x(x)
    hidden = x.shape[-1]
    if type(eps) is not float:
        eps = as_float("eps", eps)
    # A comparison, not math.isfinite: Dynamo passes a recompiled float symbolically (NaN fails it too).
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if type(dropout_p) is not float or dropout_p != 0.0:  # 0.0, the common case, is valid as it is
        dropout_p = check_dropout_p(dropout_p)
    if weight is not None:
        weight = check_vector("weight", weight, size=hidden, x=x)
    if bias is not None:
        bias = check_vector("bias", bias, size=hidden, x=x)
    if x_bias is not None:
        x_bias = check_vector("x_bias", x_bias, size=hidden, x=x)
    if residual is not None:
        if not (isinstance(residual, Tensor) and residual.is_cpu and x.is_cpu):  # on CPU: same device
            check_tensor("residual", residual, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if _any_autocast() and autocast_dtype(x) is not None:  # under autocast the residual takes x's dtype
            residual = residual.to(x.dtype)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected x's dtype {x.dtype}, got {residual.dtype}")
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    features = _FEATURES[(weight is not None) + 2 * (bias is not None) + 4 * (residual is not None)
                         + 8 * (x_bias is not None) + 16 * (dropout_p > 0.0)]
    # "cpu" without building a device object and its type string (x.device.type) on CPU
    name = resolve_call("layer_norm", "cpu" if x.is_cpu else x.device.type, x.dtype, None, features, backend)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    # N-D x and residual: seen as (rows, hidden) inside the op (see EagerOp), y viewed back to x's shape
    return _eager(x, weight, bias, residual, x_bias, seed, eps, dropout_p, name,
                  diff=(x, weight, bias, residual, x_bias), shape=None if x.dim() == 2 else x.shape)[0]


# The dispatch features of each combination of (weight, bias, residual, x_bias, dropout), by bit:
# looked up, not built, on every call.
_FEATURES = tuple(tuple(f for bit, f in enumerate(("weight", "bias", "residual", "x_bias", "dropout")) if k >> bit & 1)
                  for k in range(32))
