"""GeGLU with a fused bias: validation, dispatch, custom ops and autograd."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastbert.backends import CallInfo
from fastbert.ops._common import autocast_dtype, check, check_tensor, check_vector, new_empty, no_autocast
from fastbert.ops._dispatch import backend_module, resolve
from fastbert.ops.gelu import APPROXIMATE

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # dbias accumulator


@torch.library.custom_op("fastbert::geglu_fwd", mutates_args=())
def _geglu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    y = new_empty((x.shape[0], x.shape[1] // 2), x.dtype, x.device)
    if y.numel():
        with no_autocast(x.device.type):
            backend_module(backend, "geglu").geglu_fwd(x, bias, y, approximate=approximate)
    return y


@_geglu_fwd.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("fastbert::geglu_bwd", mutates_args=())
def _geglu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], need_dbias: bool, approximate: str,
               backend: str) -> tuple[Tensor, Tensor]:
    dx = new_empty(x.shape, x.dtype, x.device)
    dbias = new_empty((x.shape[-1],) if need_dbias else (0,), _acc(x), x.device)
    if x.numel():
        with no_autocast(x.device.type):
            backend_module(backend, "geglu").geglu_bwd(dy.contiguous(), x, bias, dx, dbias if need_dbias else None,
                                               approximate=approximate)
    else:
        dbias.zero_()
    return dx, dbias


@_geglu_bwd.register_fake
def _(dy, x, bias, need_dbias, approximate, backend):
    return torch.empty_like(x), x.new_empty((x.shape[-1],) if need_dbias else (0,), dtype=_acc(x))


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (approximate, backend)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    approximate, backend = ctx.args
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = _geglu_bwd(dy, x, bias, need_dbias, approximate, backend)
    return dx, (dbias.to(bias.dtype) if need_dbias else None), None, None


_geglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def geglu(x: Tensor, *, bias: Optional[Tensor] = None, approximate: str = "none",
          backend: Optional[str] = None) -> Tensor:
    """GeGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 with GELU for the sigmoid):
    ``gelu(z[..., :n]) * z[..., n:]`` with ``z = x + bias``, computed in fp32, stored in x's dtype.

    The first half goes through GELU and the second half is the gate: the layout of ModernBERT's
    ``input, gate = Wi(h).chunk(2, dim=-1)``. GELU as :func:`fastbert.ops.gelu` (exact erf by
    default, ``"tanh"`` for the tanh form; same accuracy notes per backend).

    Args:
        x: ``(..., 2 * n)``; fp16, bf16, fp32 or fp64; any strides (copied once when not
            contiguous). Empty in, empty out.
        bias: ``(2 * n,)`` or None, x's dtype or fp32 (the preceding dense layer's bias, fused).
        approximate: ``"none"`` or ``"tanh"``.
        backend: force a backend, else ``FASTBERT_BACKEND``, else automatic.

    Returns:
        y ``(..., n)`` in x's dtype (the autocast dtype under autocast).

    Raises:
        TypeError / ValueError naming the argument, expected and actual value (an odd last dim
        included); RuntimeError when a forced backend cannot run the call.
    """
    check_tensor("x", x, ndim=tuple(range(1, 9)), dtypes=_FLOAT_DTYPES)
    check(approximate in APPROXIMATE, ValueError, f"approximate: expected one of {APPROXIMATE}, got {approximate!r}")
    width = x.shape[-1]
    check(width % 2 == 0, ValueError, f"x: expected an even last dim (GELU half, gate half), got {width}")
    ac = autocast_dtype(x.device.type)
    if ac is not None:  # like GELU, GeGLU runs in the autocast dtype
        x = x.to(ac)
    if bias is not None:
        if ac is not None and isinstance(bias, torch.Tensor):
            bias = bias.to(ac)
        bias = check_vector("bias", bias, size=width, x=x)
    features = frozenset({"bias"}) if bias is not None else frozenset()
    name = resolve(CallInfo("geglu", x.device.type, x.dtype, None, features), backend)
    shape = x.shape
    y = _geglu_fwd(x.reshape(math.prod(shape[:-1]), width).contiguous(), bias, approximate, name)
    return y.view(shape[:-1] + (width // 2,))
