"""GELU glue of the CUDA C++ backends (``cuda`` and ``cuda-host``): tensors -> raw pointers.

Implements the GELU half of the backend contract (``fastbert.backends``) on the extension's
``gelu_fwd`` / ``gelu_bwd`` (``csrc/gelu_binding.cpp``); ``ext`` is ``fastbert._C`` or
``fastbert._C_host``. The kernels (``csrc/gelu.cu``): bias + GELU (erf or tanh form) in fp32, and a
backward whose dbias is reduced deterministically through a workspace.
"""

from __future__ import annotations

from fastbert.backends.cuda._ext import column_workspace, dtype_code, fault_injection, launch_kwargs, ptr

FEATURES = frozenset({"bias", "deterministic"})


def gelu_fwd(ext, x, bias, y, *, approximate):
    """Contract ``gelu_fwd`` on ``ext``: x/y ``[rows, hidden]`` contiguous."""
    hidden = x.shape[-1]
    ext.gelu_fwd(x=ptr(x), bias=ptr(bias), y=ptr(y), rows=x.numel() // hidden, hidden=hidden,
                 dtype=dtype_code(x), bias_dtype=dtype_code(bias), approximate=approximate,
                 fault_injection=fault_injection(), **launch_kwargs(x))


def gelu_bwd(ext, dy, x, bias, dx, dbias, *, approximate):
    """Contract ``gelu_bwd`` on ``ext``; dbias fp32, reduced deterministically."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    nbytes = ext.gelu_bwd_workspace_bytes(rows=rows, hidden=hidden, need_dbias=dbias is not None)
    ws = column_workspace(nbytes, x)
    ext.gelu_bwd(dy=ptr(dy), x=ptr(x), bias=ptr(bias), dx=ptr(dx), dbias=ptr(dbias), workspace=ptr(ws),
                 workspace_bytes=nbytes, rows=rows, hidden=hidden, dtype=dtype_code(x),
                 bias_dtype=dtype_code(bias), approximate=approximate, fault_injection=fault_injection(),
                 **launch_kwargs(x))
