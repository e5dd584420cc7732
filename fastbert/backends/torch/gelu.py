"""GELU and GeGLU with bias on the torch backend: aten's GELU kernels, the bias added once."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastbert.backends import _composite as composite


@functools.cache
def aten_erf_gelu_nan_at_posinf() -> bool:
    """Whether aten's vectorised fp32 erf GELU on this CPU returns NaN for ``+inf`` (its AVX512
    kernel does, its AVX2 one and the scalar tail give ``+inf``; fp64 and ``"tanh"`` give ``+inf``).
    The torch backend keeps aten's result there (see :func:`gelu_fwd`); the tests read this."""
    return bool(torch._C._nn.gelu(torch.full((64,), float("inf"))).isnan().any())


def _as_x_dtype(bias, x):
    """bias in x's dtype (an fp32 bias with fp64 x), without the ``.to`` call when it is already."""
    return bias if bias.dtype == x.dtype else bias.to(x.dtype)


def _plus_bias(x, bias):
    """``z = x + bias`` (x itself for no bias): one contiguous add."""
    return x if bias is None else torch.add(x, _as_x_dtype(bias, x))


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(x + bias)``.

    fp32/fp64: ``F.gelu``. fp16/bf16: the reference's erfc / sigmoid form in fp32, because
    ``F.gelu``'s ``1 + erf`` (``1 + tanh``) cancels for x < -4 and lands whole units in the last
    place of fp16/bf16 away there.

    fp32 accuracy (documented, not matched): aten's fp32 GELU keeps the absolute error below
    ``2^-21 * max(1, |z|)`` (measured on [-20, 20], forward and gradient: 1.6e-7 * max(1, |z|) with
    aten's AVX2 kernels, 2.9e-7 with its AVX512 ones),
    but in the negative tail its relative error grows: 4e-3 on [-4, -2], and ``gelu(-6)`` is -0
    (the reference, Triton and CUDA give -5.9e-9). The erfc form would match the reference there
    at 2.7x the cost of the fused ``F.gelu`` (1024 x 3072 fp32, 1 thread: 14.1 vs 5.2 ms), on the
    FFN of every CPU forward; Hugging Face's BERT calls the same ``F.gelu``. For the same reason
    fp32 ``gelu(+inf)`` (``approximate="none"``) is NaN where aten's vectorised kernel makes it so
    (AVX512 CPUs; :func:`aten_erf_gelu_nan_at_posinf`) rather than ``+inf``: finding the
    infinities costs a pass over x (measured 1024 x 3072, 2 threads: +40% of the GELU).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return composite.gelu_fwd(x, bias, y, approximate=approximate)
    y.copy_(gelu_fwd_functional(x, bias, approximate=approximate))


def gelu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: ``aten.gelu_backward`` (fp32/fp64) or the reference (fp16/bf16)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return composite.gelu_bwd(dy, x, bias, dx, dbias, approximate=approximate)
    g, gb = gelu_bwd_functional(dy, x, bias, need_dbias=dbias is not None, approximate=approximate)
    dx.copy_(g)
    if dbias is not None:
        dbias.copy_(gb)


def gelu_fwd_functional(x, bias, *, approximate):
    """:func:`gelu_fwd` returning ``y`` (a fresh tensor) instead of writing a preallocated one:
    fp32/fp64 is then one aten call (two with a bias, the GELU in place on the fresh sum), the
    plain ``F.gelu`` call's cost. ``fastbert.ops`` calls it where the backend module has it."""
    if x.dtype in (torch.float16, torch.bfloat16):
        y = torch.empty_like(x)
        composite.gelu_fwd(x, bias, y, approximate=approximate)
        return y
    if bias is None:
        return torch._C._nn.gelu(x, approximate=approximate)
    return torch._C._nn.gelu_(_plus_bias(x, bias), approximate=approximate)


def gelu_fwd_differentiable(x, bias, *, approximate):
    """:func:`gelu_fwd_functional`'s y through differentiable aten calls (the plain
    ``F.gelu(x + bias)``), or None for fp16/bf16 (the reference's fp32 math, which has no aten
    backward of that form). ``fastbert.ops``' eager path with gradients runs it under torch's
    autograd: aten's C++ nodes then do :func:`gelu_bwd_functional`'s math (``gelu_backward``; dbias
    the sum over rows in x's dtype, fp32/fp64) with no Python autograd node, keeping ``z = x + bias``
    (not x) for backward, as the plain sequence does, instead of adding the bias again there."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return None
    return torch._C._nn.gelu(_plus_bias(x, bias), approximate=approximate)


def gelu_bwd_functional(dy, x, bias, *, need_dbias, approximate):
    """:func:`gelu_bwd` returning ``(dx, dbias or None)`` (fresh tensors; dbias fp32, fp64 for fp64)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        dx = torch.empty_like(x)
        dbias = torch.empty(x.shape[-1], dtype=torch.float32, device=x.device) if need_dbias else None
        composite.gelu_bwd(dy, x, bias, dx, dbias, approximate=approximate)
        return dx, dbias
    z = _plus_bias(x, bias)
    dx = torch.ops.aten.gelu_backward.default(dy, z, approximate=approximate)
    return dx, (dx.sum(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) if need_dbias else None)


# ----------------------------------------------------------------------------------------------
# GeGLU
# ----------------------------------------------------------------------------------------------


def geglu_saves_activation(dtype):
    """Whether :func:`geglu_fwd` keeps ``gelu(a)`` for backward (``fastbert.ops`` then allocates the
    ``act`` output): fp32/fp64, whose GELU is aten's. Backward then costs two multiplies and
    aten's ``gelu_backward`` (the unfused torch sequence's work, without its concatenation)
    instead of recomputing GELU. fp16/bf16 run the reference's fp32 math, which keeps nothing."""
    return dtype in (torch.float32, torch.float64)


def _split_act(act, rows, n):
    """``(gelu(a) [rows, n], z [rows, 2n])``: contiguous views of ops' flat ``[rows * 3n]`` buffer."""
    return act[: rows * n].view(rows, n), act[rows * n:].view(rows, 2 * n)


def geglu_fwd(x, bias, y, *, approximate, act=None):
    """Backend entry point: ``y = gelu(a) * g``; fp32/fp64: aten's GELU (accuracy as ``gelu_fwd``)
    into ``act`` (``[rows, n]``, kept for backward; see :func:`geglu_saves_activation`) or ``y``,
    then multiplied by the gate; fp16/bf16: the reference (see ``gelu_fwd``)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return composite.geglu_fwd(x, bias, y, approximate=approximate)
    n = y.shape[-1]
    if act is not None and act.dim() == 1:  # act = [gelu(a) | z] (ops' flat layout with a bias)
        act, z = _split_act(act, x.shape[0], n)
        torch.add(x, _as_x_dtype(bias, x), out=z)
    else:
        z = _plus_bias(x, bias)  # one contiguous add, not two strided ones
    a, g = z[:, :n], z[:, n:]
    if act is None:
        torch._C._nn.gelu(a, approximate=approximate, out=y)
        y.mul_(g)
    else:
        torch._C._nn.gelu(a, approximate=approximate, out=act)
        torch.mul(act, g, out=y)


def geglu_fwd_differentiable(x, bias, *, approximate):
    """y of :func:`geglu_fwd` through differentiable aten calls (the unfused
    ``a, g = (x + bias).chunk(2, -1); F.gelu(a) * g``) for fastbert.ops' eager path with gradients
    (as :func:`gelu_fwd_differentiable`: aten's backward nodes, which keep ``gelu(a)`` and ``z``), or
    None for fp16/bf16. x: ``(..., 2n)``."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return None
    a, g = _plus_bias(x, bias).chunk(2, dim=-1)
    return torch._C._nn.gelu(a, approximate=approximate) * g


def geglu_bwd(dy, x, bias, dx, dbias, *, approximate, act=None):
    """Backend entry point: ``da = gelu'(a) * (dy * g)`` (aten's ``gelu_backward``), ``dg = dy * gelu(a)``
    with ``gelu(a)`` the forward's ``act`` (recomputed when None), written into the two halves of ``dx``."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return composite.geglu_bwd(dy, x, bias, dx, dbias, approximate=approximate)
    n = dy.shape[-1]
    if act is not None and act.dim() == 1:  # the forward's z: no second bias add (x is a placeholder)
        act, z = _split_act(act, dy.shape[0], n)
    else:
        z = _plus_bias(x, bias)
    a, g = z[:, :n], z[:, n:]
    da, dg = dx[:, :n], dx[:, n:]
    torch.mul(dy, g, out=da)
    torch.ops.aten.gelu_backward.grad_input(da, a, approximate=approximate, grad_input=da)  # elementwise
    # aten's GELU with a strided out= writes elsewhere (caught by the poisoned-output tests)
    torch.mul(F.gelu(a, approximate=approximate) if act is None else act, dy, out=dg)
    if dbias is not None:
        dbias.copy_(dx.sum(0, dtype=dbias.dtype))
