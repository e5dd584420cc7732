"""The composite GELU and GeGLU math (with bias), plain PyTorch that reads like the math,
fp64-capable; shared by the ``reference`` and ``torch`` backends (see :mod:`._composite`)."""

from __future__ import annotations

import math

import torch

from fastbert.backends._composite_common import acc_dtype

# ----------------------------------------------------------------------------------------------
# GELU with bias
# ----------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_math(x, approximate="none"):
    """GELU (Hendrycks & Gimpel 2016): ``x * Phi(x)`` exactly, or the tanh approximation
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    ``Phi(x) = 0.5 erfc(-x / sqrt(2))`` and ``0.5 (1 + tanh(u)) = sigmoid(2 u)``: the same values
    without the cancellation of ``1 + erf`` / ``1 + tanh`` that loses every digit in fp32 for x < -4.
    """
    if approximate == "tanh":
        return x * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * x * torch.erfc(-x / math.sqrt(2.0))


def gelu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(x + bias)`` computed in fp32 (fp64 for fp64)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    y.copy_(gelu_math(z, approximate))


def gelu_grad_math(z, approximate="none"):
    """d gelu / dz: ``Phi(z) + z phi(z)`` exactly, or the derivative of the tanh form."""
    if approximate == "tanh":  # with s = sigmoid(2u) = 0.5 (1 + tanh u): d/dz z s = s + 2 z s (1 - s) u'
        s = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))
        return s + 2.0 * z * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def gelu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point: dx = dy * gelu'(x + bias); dbias = sum_rows(dx) in fp32."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    gz = dy.to(cdt) * gelu_grad_math(z, approximate)
    dx.copy_(gz)
    if dbias is not None:
        dbias.copy_(gz.sum(0))


# ----------------------------------------------------------------------------------------------
# GeGLU: y = gelu(x[:, :n] + b[:n]) * (x[:, n:] + b[n:])  (Shazeer 2020, eq. 6 with GELU)
# ----------------------------------------------------------------------------------------------


def _geglu_halves(x, bias, cdt):
    """``(a, g)``: the GELU input and the gate, each ``[rows, n]`` in ``cdt``, biases added."""
    n = x.shape[-1] // 2
    xf = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    return xf[:, :n], xf[:, n:]


def geglu_fwd(x, bias, y, *, approximate):
    """Backend entry point: ``y = gelu(a) * g`` with ``a, g = (x + bias)`` split in halves, in fp32
    (fp64 for fp64)."""
    a, g = _geglu_halves(x, bias, acc_dtype(x.dtype))
    y.copy_(gelu_math(a, approximate) * g)


def geglu_bwd(dy, x, bias, dx, dbias, *, approximate):
    """Backend entry point. With ``y = gelu(a) * g``: ``da = dy * g * gelu'(a)``, ``dg = dy * gelu(a)``;
    ``dx = [da, dg]``, ``dbias = sum_rows(dx)`` in fp32 (fp64 for fp64)."""
    cdt = acc_dtype(x.dtype)
    a, g = _geglu_halves(x, bias, cdt)
    dyf = dy.to(cdt)
    d = torch.cat((dyf * g * gelu_grad_math(a, approximate), dyf * gelu_math(a, approximate)), dim=-1)
    dx.copy_(d)
    if dbias is not None:
        dbias.copy_(d.sum(0))
