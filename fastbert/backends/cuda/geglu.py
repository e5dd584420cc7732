"""GeGLU glue of the CUDA C++ backends (``cuda`` and ``cuda-host``): tensors -> raw pointers.

Implements the GeGLU half of the backend contract (``fastbert.backends``) on the extension's
``geglu_fwd`` / ``geglu_bwd`` (``csrc/geglu_binding.cpp``); ``ext`` is ``fastbert._C`` or
``fastbert._C_host``. The kernels (``csrc/geglu.cu``): ``y = gelu(a) * g`` with the bias fused (erf
or tanh GELU, fp32 math) and a backward writing both halves of dx, whose dbias is reduced
deterministically through a workspace.
"""

from __future__ import annotations

from fastbert.backends.cuda._ext import column_workspace, dtype_code, fault_injection, launch_kwargs, ptr

FEATURES = frozenset({"bias", "deterministic"})


def geglu_fwd(ext, x, bias, y, *, approximate):
    """Contract ``geglu_fwd`` on ``ext``: x ``[rows, 2n]``, y ``[rows, n]``, bias ``[2n]``, contiguous."""
    rows, half = y.shape
    ext.geglu_fwd(x=ptr(x), bias=ptr(bias), y=ptr(y), rows=rows, half=half, dtype=dtype_code(x),
                  bias_dtype=dtype_code(bias), approximate=approximate, fault_injection=fault_injection(),
                  **launch_kwargs(x))


def geglu_bwd(ext, dy, x, bias, dx, dbias, *, approximate):
    """Contract ``geglu_bwd`` on ``ext``; dbias ``[2n]`` fp32, reduced deterministically."""
    rows, half = dy.shape
    nbytes = ext.geglu_bwd_workspace_bytes(rows=rows, half=half, need_dbias=dbias is not None)
    ws = column_workspace(nbytes, x)
    ext.geglu_bwd(dy=ptr(dy), x=ptr(x), bias=ptr(bias), dx=ptr(dx), dbias=ptr(dbias), workspace=ptr(ws),
                  workspace_bytes=nbytes, rows=rows, half=half, dtype=dtype_code(x), bias_dtype=dtype_code(bias),
                  approximate=approximate, fault_injection=fault_injection(), **launch_kwargs(x))
