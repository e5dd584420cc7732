"""Shared pieces of the ops layer: argument checks, output allocation, dropout seeds, numerics flags."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from fastbert.backends import set_workspace_allocator

_POISON = os.environ.get("FASTBERT_POISON_OUTPUTS") == "1"


def set_poison_outputs(enabled: bool) -> bool:
    """Fill every output and workspace with NaN (ints with -1) before a backend writes it.

    A test switch: an element a kernel forgets to write then fails parity. Returns the old value.
    """
    global _POISON
    old, _POISON = _POISON, bool(enabled)
    return old


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Context manager form of :func:`set_poison_outputs`."""
    old = set_poison_outputs(enabled)
    try:
        yield
    finally:
        set_poison_outputs(old)


def new_empty(shape, dtype, device) -> torch.Tensor:
    """Allocate an output/workspace; poisoned when the test switch is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


set_workspace_allocator(new_empty)  # backends' scratch memory comes from here too


def check(cond: bool, exc: type[Exception], msg: str) -> None:
    """Raise ``exc(msg)`` unless ``cond``."""
    if not cond:
        raise exc(msg)


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None) -> None:
    """Metadata checks that name the argument, the expected and the actual value.

    Messages are built only on failure (formatting them costs more than the checks)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = ndim if isinstance(ndim, tuple) else (ndim,)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {_ndims_text(allowed)} dims, got {t.dim()} "
                             f"(shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _ndims_text(allowed: tuple) -> str:
    """``"4"``, ``"3 or 4"``, or ``"1 to 8"`` for three or more consecutive ndims."""
    if len(allowed) > 2 and tuple(allowed) == tuple(range(allowed[0], allowed[0] + len(allowed))):
        return f"{allowed[0]} to {allowed[-1]}"
    return " or ".join(map(str, allowed))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # every op's inputs
_X_NDIMS = tuple(range(1, 9))  # LayerNorm's and GELU's x: 1 to 8 dims


def check_x(x) -> None:
    """``x`` of LayerNorm / GELU / GeGLU: a float tensor of 1 to 8 dims. The common case is one
    test reading each fact once; :func:`check_tensor` runs only to raise, naming what is wrong."""
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and 0 < x.dim() <= _X_NDIMS[-1]):
        check_tensor("x", x, ndim=_X_NDIMS, dtypes=FLOAT_DTYPES)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype statistics and parameter gradients accumulate in (LayerNorm's mean / rstd, dbias,
    dweight): fp64 for fp64 x, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_vector(name: str, t, *, size: int, x: torch.Tensor) -> torch.Tensor:
    """A ``(size,)`` parameter of x's dtype or fp32 on x's device; returns it contiguous.

    Every backend then reads it as a plain array: a strided or expanded (stride-0) view costs one
    copy of ``size`` elements here instead of a stride argument in every kernel.
    """
    if (isinstance(t, torch.Tensor) and t.shape == (size,)  # one Size built, not dim() and shape[0]
            and (t.dtype == x.dtype or t.dtype == torch.float32)
            and (t.is_cpu and x.is_cpu or t.device == x.device)):  # is_cpu: no device objects built
        return t.contiguous()  # the common case: each fact read once, before any check builds a message
    check_tensor(name, t, ndim=1, device=x.device)
    if t.shape[0] != size:
        raise ValueError(f"{name}: expected shape ({size},), got {tuple(t.shape)}")
    if t.dtype != x.dtype and t.dtype != torch.float32:
        allowed = list(dict.fromkeys((x.dtype, torch.float32)))
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    return t.contiguous()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call (its argument parsing) when t has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


def as_float(name: str, value) -> float:
    """A Python float from an int/float argument.

    Under ``torch.compile`` a float argument can arrive symbolic (Dynamo makes it dynamic after a
    recompile); ``float()`` specializes it so checks and messages see a plain number.
    """
    if type(value) is float:  # the common case, one check
        return value
    if not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) or isinstance(value, bool):
        raise TypeError("%s: expected a float, got %s" % (name, type(value).__name__))
    return float(value)


def check_dropout_p(dropout_p) -> float:
    """Validate ``0 <= dropout_p < 1``; returns it as a float."""
    p = as_float("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {p!r}")
    return p


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Value checks (which read tensor data) run for CPU tensors or with FASTBERT_CHECK_INPUTS=1,
    never while compiling or capturing a CUDA graph: the fast path trusts its inputs."""
    if torch.compiler.is_compiling():
        return False
    if any(t.device.type == "cuda" for t in tensors if t is not None):
        if torch.cuda.is_current_stream_capturing():
            return False
        return os.environ.get("FASTBERT_CHECK_INPUTS") == "1"
    return True


def draw_seed(device: torch.device) -> torch.Tensor:
    """Two uint32 Philox key words as int64 ``[2]`` on ``device``, from torch's RNG.

    A torch RNG op: reproduced by ``torch.manual_seed``, graph-safe, replayed by activation
    checkpointing (which restores the RNG state).
    """
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def allow_tf32(t: torch.Tensor) -> bool:
    """Whether fp32 matmuls may use TF32, from torch's matmul precision setting (IEEE by default)."""
    return t.dtype == torch.float32 and t.is_cuda and torch.get_float32_matmul_precision() != "highest"


def deterministic() -> bool:
    """``torch.are_deterministic_algorithms_enabled()``, passed down to the backends."""
    return torch.are_deterministic_algorithms_enabled()


_any_autocast = torch._C._is_any_autocast_enabled  # one C call; Dynamo folds it like is_autocast_enabled
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def _device_type(device) -> str:
    """The device type of a device type string, a tensor or a torch.device."""
    if isinstance(device, str):
        return device
    return device.device.type if isinstance(device, torch.Tensor) else device.type


def autocast_dtype(device) -> torch.dtype | None:
    """The autocast dtype for ``device`` (a device type, or a tensor whose device is read only when
    some autocast is on) when autocast is on there, else None (also for a device autocast does not
    know, such as ``meta``: dispatch then names the device)."""
    if not _any_autocast():  # the common case: no device read, no per-device query
        return None
    device_type = _device_type(device)
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        pass
    return None


def no_autocast(device):
    """Backends compute in the dtypes ops/ chose: autocast off inside the custom ops (a reused
    no-op context, which costs nothing, when autocast is off already: the common case).
    ``device``: a device type, or a tensor (its device is read only when some autocast is on)."""
    if _any_autocast():
        device_type = _device_type(device)
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    return _NO_CONTEXT


def no_double_backward(bwd_op, op: str) -> None:
    """Give backward custom op ``bwd_op`` of ``fastbert.ops.<op>`` an autograd formula that raises
    a clear error: a gradient taken with ``create_graph=True`` then exists (as for any op), and
    only differentiating it again fails, naming the op, instead of torch's generic "no autograd
    formula was registered" for an internal op name."""
    def backward(ctx, *grads):
        raise RuntimeError(f"fastbert.ops.{op}: double backward (differentiating a gradient taken with "
                           "create_graph=True) is not supported; the first gradient is exact")
    bwd_op.register_autograd(backward)


# ----------------------------------------------------------------------------------------------
# The eager fast path of a custom op
# ----------------------------------------------------------------------------------------------

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# eager_direct's C calls bound once: each ``torch._C.<name>`` is two module lookups per call otherwise
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_is_compiling = torch.compiler.is_compiling  # the same function object: Dynamo still folds it
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_Tensor = torch.Tensor


def eager_direct(*tensors) -> bool:
    """Whether an eager call may run a custom op's implementation without the dispatcher.

    A ``torch.library.custom_op`` costs tens of microseconds of Python plumbing per call
    (schema binding, autograd wrapper, redispatch), more than the op itself at small shapes.
    Plain eager calls (plain tensors, no torch-function / dispatch mode, no functorch transform,
    not compiling) run the same implementation through :class:`_EagerOp` instead; everything
    else (``torch.compile``, fake tensors, ``make_fx``, ``opcheck``, vmap, a functorch wrapper
    that outlived its transform) goes through the registered custom op, so its fake and autograd
    registrations stay what tracing sees.
    """
    if _is_compiling() or _dispatch_stack_len():
        return False
    if _torch_function_mode_enabled() or _peek_interpreter_stack() is not None:
        return False
    for t in tensors:  # a loop, not all(<genexpr>): this runs on every call
        if isinstance(t, _Tensor) and (type(t) not in _PLAIN or _is_wrapped(t)):
            return False
    return True


class EagerOp:
    """One custom op's pieces for the eager fast path: the forward implementation (the function
    the custom op was made from, or an eager variant that may return None for an unused output),
    its ``setup_context`` and ``backward`` (which take ``bwd=``, the backward op to call), the
    backward's custom op and implementation (the eager one may return None for a gradient not
    asked for), whether the forward returns a tuple whose outputs after the first carry no
    gradient (``stats``), the positions of the inputs that are ``(rows, last dim)`` views of
    the caller's N-D tensors (``flat``; see :meth:`__call__`'s ``shape``), and ``native``: None, or
    a function of the (N-D) inputs that returns the forward's outputs computed by differentiable
    aten calls of the backend (its declared ``<op>_fwd_differentiable``; at least a tuple whose
    first element is the op's one differentiable output, which is all callers read), or None
    where the backend has none for the call. With gradients the eager path runs it under torch's autograd: aten's
    own backward nodes (C++, no Python node, the plain torch sequence's graph) instead of
    :class:`_EagerFunction` and the backward op. ``no_grad_impl``: the forward of eager calls
    that record no gradient, where it differs from ``fwd_impl`` (the same arguments; its outputs
    may stop after the first, as ``native``'s; ``fwd_impl`` when None)."""

    def __init__(self, fwd_op, fwd_impl, setup_context, backward, bwd_op, bwd_impl, stats=False, flat=(0,),
                 native=None, no_grad_impl=None):
        self.fwd_op, self.fwd_impl = fwd_op, fwd_impl
        self.setup_context, self.backward = setup_context, backward
        self.bwd_op, self.bwd_impl = bwd_op, bwd_impl
        self.stats, self.flat, self.native = stats, flat, native
        self.no_grad_impl = fwd_impl if no_grad_impl is None else no_grad_impl

    def __call__(self, *inputs, diff=(), shape=None):
        """``fwd_op(*inputs)``; ``diff`` the tensor inputs that may need a gradient.

        ``shape``: None, or the N-D shape of the ``flat`` inputs, which the op sees flattened to
        ``(rows, shape[-1])``; the first output is viewed back to ``shape[:-1] + (its last dim,)``.
        On the eager path with gradients the flattening happens inside the autograd node, so
        neither view is an autograd node of its own (two fewer per call, forward and backward)."""
        if not eager_direct(*inputs):
            return self._unflatten(self.fwd_op(*self._flatten(inputs, shape)), shape)
        if torch.is_grad_enabled():
            for t in diff:
                if t is not None and t.requires_grad:
                    if self.native is not None:
                        outputs = self.native(*inputs)
                        if outputs is not None:
                            return outputs
                    return _apply(*inputs, self, shape)
        if shape is None:
            return self.no_grad_impl(*inputs)
        return self._unflatten(self.no_grad_impl(*self._flatten(inputs, shape)), shape)

    def _flatten(self, inputs, shape):
        if shape is None:
            return inputs
        rows = math.prod(shape[:-1])  # not reshape(-1, hidden): that is ambiguous for hidden == 0
        if self.flat == (0,):  # x only: no loop
            return (inputs[0].reshape(rows, shape[-1]),) + inputs[1:]
        return tuple(t.reshape(rows, shape[-1]) if i in self.flat and t is not None else t
                     for i, t in enumerate(inputs))

    def _unflatten(self, outputs, shape):
        if shape is None:
            return outputs
        single = isinstance(outputs, torch.Tensor)
        y = outputs if single else outputs[0]
        last = y.shape[-1]
        y = y.view(shape) if last == shape[-1] else y.view(shape[:-1] + (last,))
        return y if single else (y,) + tuple(outputs[1:])


class _EagerFunction(torch.autograd.Function):
    """The autograd node of :class:`EagerOp`: the custom op's own setup_context and backward.
    The op and the N-D shape ride last so ``ctx.needs_input_grad`` keeps the custom op's input
    positions."""

    @staticmethod
    def forward(ctx, *args):
        op, shape = args[-2], args[-1]
        inputs = args[:-2] if shape is None else op._flatten(args[:-2], shape)
        outputs = op.fwd_impl(*inputs)
        op.setup_context(ctx, inputs, outputs)
        ctx.eager_op, ctx.shape = op, shape
        if op.stats:
            ctx.mark_non_differentiable(*[t for t in outputs[1:] if t is not None])
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics outputs
        return outputs if shape is None else op._unflatten(outputs, shape)

    @staticmethod
    def backward(ctx, *grads):
        op, shape = ctx.eager_op, ctx.shape
        if grads[0] is None:  # no gradient reached the one differentiable output: none flows back
            return (None,) * len(ctx.needs_input_grad)
        if shape is not None:
            g = grads[0]
            grads = (g.reshape(math.prod(shape[:-1]), g.shape[-1]),) + grads[1:]
        # create_graph=True: the custom op (as the registered autograd would call it)
        bwd = op.bwd_op if torch.is_grad_enabled() else op.bwd_impl
        out = op.backward(ctx, *grads, bwd=bwd)
        if shape is not None:
            out = tuple(g.view(shape) if i in op.flat and g is not None else g for i, g in enumerate(out))
        return (*out, None, None)


# Function.apply without its Python wrapper: eager_direct already excluded what that wrapper
# handles (functorch transforms, dead functorch wrappers), and the wrapper costs microseconds.
_apply = super(torch.autograd.Function, _EagerFunction).apply
