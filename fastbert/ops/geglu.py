"""GeGLU with a fused bias: validation, dispatch, custom ops and autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbert.ops._common import EagerOp, acc_dtype, as_dtype, new_empty, no_autocast, no_double_backward
from fastbert.ops._dispatch import backend_module, resolve_call
from fastbert.ops.gelu import _BIAS, check_gelu_inputs, dbias_output


def _act_shape(x: Tensor, bias: Optional[Tensor], backend: str) -> tuple:
    """What the forward keeps for backward, for a backend whose compute module declares
    ``geglu_saves_activation(dtype)`` for x's dtype (its backward then multiplies instead of
    recomputing GELU: the torch backend on CPU, where GELU costs several times a multiply):
    ``gelu(a)`` ``(rows, n)``; with a bias, one flat buffer ``(rows * 3n,)`` holding ``gelu(a)``
    then ``z = x + bias`` (``(rows, 2n)``), so backward neither re-adds the bias nor needs x (the
    unfused sequence keeps the same 3n per row). Else ``(0,)`` (a fused kernel recomputes for
    free). Decided from the backend name, dtype and bias alone, so the fake gives the same shape."""
    saves = getattr(backend_module(backend, "geglu"), "geglu_saves_activation", None)
    if saves is not None and saves(x.dtype):
        rows, n = x.shape[0], x.shape[1] // 2
        return (rows, n) if bias is None else (rows * 3 * n,)
    return (0,)


def _keeps_z(act: Tensor) -> bool:
    """Whether a saved activation holds ``z = x + bias`` too (the flat layout of :func:`_act_shape`)."""
    return act.dim() == 1 and act.numel() > 0


def _geglu_fwd_impl(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> tuple[Tensor, Tensor]:
    y = new_empty((x.shape[0], x.shape[1] // 2), x.dtype, x.device)
    act = new_empty(_act_shape(x, bias, backend), x.dtype, x.device)
    if y.numel():
        with no_autocast(x):
            backend_module(backend, "geglu").geglu_fwd(x, bias, y, approximate=approximate,
                                                       **({"act": act} if act.numel() else {}))
    return y, act


_geglu_fwd = torch.library.custom_op("fastbert::geglu_fwd", mutates_args=())(_geglu_fwd_impl)


@_geglu_fwd.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty((x.shape[0], x.shape[1] // 2)), x.new_empty(_act_shape(x, bias, backend))


def _geglu_bwd_impl(dy: Tensor, x: Tensor, bias: Optional[Tensor], act: Tensor, need_dbias: bool,
                    approximate: str, backend: str) -> tuple[Tensor, Tensor]:
    dx, dbias = _geglu_bwd_run(dy, x, bias, act, need_dbias, approximate, backend)
    return dx, dbias_output(dbias, x)


def _geglu_bwd_run(dy, x, bias, act, need_dbias, approximate, backend):
    """``(dx, dbias)``, dbias None when not needed (the eager path's backward: no placeholder)."""
    shape = (dy.shape[0], 2 * dy.shape[1])  # x's (x itself is an empty placeholder when act keeps z)
    dx = new_empty(shape, x.dtype, x.device)
    dbias = new_empty((shape[-1],), acc_dtype(x), x.device) if need_dbias else None
    if dx.numel():
        with no_autocast(x):
            backend_module(backend, "geglu").geglu_bwd(dy.contiguous(), x, bias, dx, dbias, approximate=approximate,
                                                       **({"act": act} if act.numel() else {}))
    elif dbias is not None:
        dbias.zero_()
    return dx, dbias


_geglu_bwd = torch.library.custom_op("fastbert::geglu_bwd", mutates_args=())(_geglu_bwd_impl)
no_double_backward(_geglu_bwd, "geglu")


@_geglu_bwd.register_fake
def _(dy, x, bias, act, need_dbias, approximate, backend):
    shape = (dy.shape[0], 2 * dy.shape[1])
    return x.new_empty(shape), x.new_empty((shape[-1],) if need_dbias else (0,), dtype=acc_dtype(x))


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    act = output[1]
    # act holding z makes x unneeded: keep an empty placeholder of its dtype, not x's memory
    ctx.save_for_backward(x.new_empty((0,)) if _keeps_z(act) else x, bias, act)
    ctx.args = (approximate, backend)


def _backward(ctx, dy, dact, bwd=None):
    x, bias, act = ctx.saved_tensors
    approximate, backend = ctx.args
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = (bwd or _geglu_bwd)(dy, x, bias, act, need_dbias, approximate, backend)
    return dx, (as_dtype(dbias, bias.dtype) if need_dbias else None), None, None


def _differentiable(x, bias, approximate, backend):
    """``(y, None)`` from the backend's ``geglu_fwd_differentiable`` (None where it has none for the
    call): on the torch backend, fp32/fp64, the unfused sequence's graph."""
    fn = getattr(backend_module(backend, "geglu"), "geglu_fwd_differentiable", None)
    y = None if fn is None else fn(x, bias, approximate=approximate)
    return None if y is None else (y, None)


# Up to this many elements of x, aten's graph (no Python node) wins with gradients; above it the
# fused backward's writes into dx's two halves win (the unfused graph concatenates da and dg: one
# more pass over dx). Measured fwd+bwd, width 2304, fp32, 1 thread (CPU time, under load):
# aten's graph / fused node = 0.80 at 16 rows, 0.87 at 64, 1.14 at 256 and 1024.
_NATIVE_MAX_NUMEL = 1 << 18


def _native(x, bias, approximate, backend):
    """EagerOp's ``native`` with gradients: :func:`_differentiable` for small x (see above)."""
    return _differentiable(x, bias, approximate, backend) if x.numel() <= _NATIVE_MAX_NUMEL else None


def _geglu_fwd_no_grad(x, bias, approximate, backend):
    """The eager forward without gradients: :func:`_differentiable` where the backend has it (the
    unfused sequence's allocations, no ``act`` buffer nobody reads), else the custom op's."""
    out = _differentiable(x, bias, approximate, backend)
    return _geglu_fwd_impl(x, bias, approximate, backend) if out is None else out


_geglu_fwd.register_autograd(_backward, setup_context=_setup_context)
_eager = EagerOp(_geglu_fwd, _geglu_fwd_impl, _setup_context, _backward, _geglu_bwd, _geglu_bwd_run,
                 stats=True, native=_native, no_grad_impl=_geglu_fwd_no_grad)


def geglu(x: Tensor, *, bias: Optional[Tensor] = None, approximate: str = "none",
          backend: Optional[str] = None) -> Tensor:
    """GeGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 with GELU for the sigmoid):
    ``gelu(z[..., :n]) * z[..., n:]`` with ``z = x + bias``, computed in fp32, stored in x's dtype.

    The first half goes through GELU and the second half is the gate: the layout of ModernBERT's
    ``input, gate = Wi(h).chunk(2, dim=-1)``. GELU as :func:`fastbert.ops.gelu` (exact erf by
    default, ``"tanh"`` for the tanh form; same accuracy notes per backend). Memory: the torch
    backend keeps ``gelu(z[..., :n])`` (``(..., n)``, x's dtype, fp32/fp64 x) for backward while
    gradients are recorded, as the unfused torch sequence does.

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
    x, bias = check_gelu_inputs(x, bias, approximate)
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"x: expected an even last dim (GELU half, gate half), got {width}")
    dev = "cpu" if x.is_cpu else x.device.type  # x.device.type builds two objects: ~0.7 us on CPU
    name = resolve_call("geglu", dev, x.dtype, None, _BIAS if bias is not None else (), backend)
    x = x.contiguous()
    # N-D x: seen as (rows, 2n) inside the op (see EagerOp), y viewed back to (..., n)
    return _eager(x, bias, approximate, name, diff=(x, bias), shape=None if x.dim() == 2 else x.shape)[0]
