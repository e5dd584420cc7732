"""GELU with a fused bias: validation, dispatch, custom ops and autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbert.ops._common import (EagerOp, acc_dtype, as_dtype, autocast_dtype, check_vector, check_x, new_empty,
                                  no_autocast, no_double_backward)
from fastbert.ops._dispatch import backend_module, resolve_call

APPROXIMATE = ("none", "tanh")
_BIAS = ("bias",)


def check_approximate(approximate) -> str:
    """Validate ``approximate`` (one of :data:`APPROXIMATE`); returns it.

    Raises:
        ValueError: naming the argument, the allowed values and the value given.
    """
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate: expected one of {APPROXIMATE}, got {approximate!r}")
    return approximate


def check_gelu_inputs(x, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Optional[Tensor]]:
    """The validation GELU and GeGLU share: ``x`` a float tensor of 1 to 8 dims, ``approximate``
    one of :data:`APPROXIMATE`, ``bias`` None or a vector of x's last dim, x's dtype or fp32;
    under autocast both take the autocast dtype (GELU runs in it). Returns ``(x, bias)``, the bias
    contiguous."""
    check_x(x)
    check_approximate(approximate)
    ac = autocast_dtype(x)
    if ac is not None:
        x = x.to(ac)
    if bias is not None:
        if ac is not None and isinstance(bias, torch.Tensor):
            bias = bias.to(ac)
        bias = check_vector("bias", bias, size=x.shape[-1], x=x)
    return x, bias


def _gelu_fwd_impl(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    mod = backend_module(backend, "gelu")
    functional = getattr(mod, "gelu_fwd_functional", None)
    if functional is not None and x.numel():  # the backend allocates what it returns
        with no_autocast(x):
            return functional(x, bias, approximate=approximate)
    y = new_empty(x.shape, x.dtype, x.device)
    if x.numel():
        with no_autocast(x):
            mod.gelu_fwd(x, bias, y, approximate=approximate)
    return y


_gelu_fwd = torch.library.custom_op("fastbert::gelu_fwd", mutates_args=())(_gelu_fwd_impl)


@_gelu_fwd.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x)


def dbias_output(dbias: Optional[Tensor], x: Tensor) -> Tensor:
    """A backward custom op's dbias output (GELU's and GeGLU's): ``dbias``, or where it is None
    (not needed) an empty tensor of :func:`acc_dtype`, since a custom op returns tensors only."""
    return x.new_empty((0,), dtype=acc_dtype(x)) if dbias is None else dbias


def _gelu_bwd_impl(dy: Tensor, x: Tensor, bias: Optional[Tensor], need_dbias: bool, approximate: str,
                   backend: str) -> tuple[Tensor, Tensor]:
    dx, dbias = _gelu_bwd_run(dy, x, bias, need_dbias, approximate, backend)
    return dx, dbias_output(dbias, x)


def _gelu_bwd_run(dy, x, bias, need_dbias, approximate, backend):
    """``(dx, dbias)``, dbias None when not needed (the eager path's backward: no placeholder)."""
    mod = backend_module(backend, "gelu")
    functional = getattr(mod, "gelu_bwd_functional", None)
    if functional is not None and x.numel():
        with no_autocast(x):
            return functional(dy.contiguous(), x, bias, need_dbias=need_dbias, approximate=approximate)
    dx = new_empty(x.shape, x.dtype, x.device)
    dbias = new_empty((x.shape[-1],), acc_dtype(x), x.device) if need_dbias else None
    if x.numel():
        with no_autocast(x):
            mod.gelu_bwd(dy.contiguous(), x, bias, dx, dbias, approximate=approximate)
    elif dbias is not None:
        dbias.zero_()
    return dx, dbias


_gelu_bwd = torch.library.custom_op("fastbert::gelu_bwd", mutates_args=())(_gelu_bwd_impl)
no_double_backward(_gelu_bwd, "gelu")


@_gelu_bwd.register_fake
def _(dy, x, bias, need_dbias, approximate, backend):
    return torch.empty_like(x), x.new_empty((x.shape[-1],) if need_dbias else (0,), dtype=acc_dtype(x))


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (approximate, backend)


def _backward(ctx, dy, bwd=None):
    x, bias = ctx.saved_tensors
    approximate, backend = ctx.args
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = (bwd or _gelu_bwd)(dy, x, bias, need_dbias, approximate, backend)
    return dx, (as_dtype(dbias, bias.dtype) if need_dbias else None), None, None


def _native(x, bias, approximate, backend):
    """y from the backend's ``gelu_fwd_differentiable`` (None where it has none for the call):
    on the torch backend, fp32/fp64, the plain ``F.gelu(x + bias)`` graph (see EagerOp)."""
    fn = getattr(backend_module(backend, "gelu"), "gelu_fwd_differentiable", None)
    return None if fn is None else fn(x, bias, approximate=approximate)


_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)
_eager = EagerOp(_gelu_fwd, _gelu_fwd_impl, _setup_context, _backward, _gelu_bwd, _gelu_bwd_run, native=_native)


def gelu(x: Tensor, *, bias: Optional[Tensor] = None, approximate: str = "none",
         backend: Optional[str] = None) -> Tensor:
    """GELU of ``x + bias`` (Hendrycks & Gimpel 2016), computed in fp32, stored in x's dtype.

    ``approximate="none"``: ``z * Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))`` (BERT's ``gelu``);
    ``"tanh"``: ``0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))`` (``gelu_new``).
    ``gelu(+inf) = +inf`` and ``gelu(-inf) = NaN`` (``-inf * 0``) on every backend (except the
    torch backend's fp32 erf GELU on CPUs whose aten kernel gives NaN for +inf: AVX512). Accuracy: the
    reference, Triton and CUDA keep relative precision in the negative tail (erfc / sigmoid forms);
    the torch backend's fp32 path is aten's ``F.gelu``, whose error is absolute, below
    ``2^-21 * max(1, |z|)`` (``gelu(-6)`` is -0 there; see ``fastbert.backends.torch.gelu_fwd``).
    With gradients, an eager fp32/fp64 call on the torch backend records the plain
    ``F.gelu(x + bias)`` graph (aten's backward; ``x + bias`` kept for it, as there).

    Args:
        x: ``(..., hidden)``; fp16, bf16, fp32 or fp64; any strides. Empty in, empty out.
        bias: ``(hidden,)`` or None, x's dtype or fp32 (the preceding dense layer's bias, fused);
            any strides (a strided or expanded view is copied once here, so every backend reads
            a contiguous vector).
        approximate: ``"none"`` or ``"tanh"``.
        backend: force a backend, else ``FASTBERT_BACKEND``, else automatic.

    Returns:
        y with x's shape and dtype (the autocast dtype under autocast).

    Raises:
        TypeError / ValueError naming the argument, expected and actual value;
        RuntimeError when a forced backend cannot run the call.
    """
    x, bias = check_gelu_inputs(x, bias, approximate)
    dev = "cpu" if x.is_cpu else x.device.type  # x.device.type builds two objects: ~0.7 us on CPU
    name = resolve_call("gelu", dev, x.dtype, None, _BIAS if bias is not None else (), backend)
    x = x.contiguous()
    # N-D x: seen as (rows, hidden) inside the op (see EagerOp), y viewed back to x's shape
    return _eager(x, bias, approximate, name, diff=(x, bias), shape=None if x.dim() == 2 else x.shape)
