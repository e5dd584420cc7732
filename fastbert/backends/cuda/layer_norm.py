"""LayerNorm glue of the CUDA C++ backends (``cuda`` and ``cuda-host``): tensors -> raw pointers.

Implements the LayerNorm half of the backend contract (``fastbert.backends``) on the extension's
``layer_norm_fwd`` / ``layer_norm_bwd`` (``csrc/layer_norm_binding.cpp``); ``ext`` is
``fastbert._C`` or ``fastbert._C_host``. The kernels (``csrc/layer_norm.cu``): BERT's add & norm
in one pass (``h = dropout(x + x_bias) + residual``, Welford statistics in fp32) and a backward
whose column sums (dweight, dbias, dx_bias) are reduced deterministically through a workspace.
"""

from __future__ import annotations

from fastbert.backends.cuda._ext import column_workspace, dtype_code, fault_injection, launch_kwargs, ptr

FEATURES = frozenset({"weight", "bias", "residual", "x_bias", "dropout", "deterministic"})


def layer_norm_fwd(ext, x, weight, bias, residual, x_bias, y, mean, rstd, h, *, eps, dropout_p, seed):
    """Contract ``layer_norm_fwd`` on ``ext``: x/residual/y/h ``[rows, hidden]`` and
    weight/bias/x_bias ``[hidden]`` contiguous (``fastbert.ops`` guarantees it)."""
    rows, hidden = x.shape
    ext.layer_norm_fwd(
        x=ptr(x), weight=ptr(weight), bias=ptr(bias), residual=ptr(residual), x_bias=ptr(x_bias),
        y=ptr(y), mean=ptr(mean), rstd=ptr(rstd), h=ptr(h), seed=ptr(seed) if dropout_p > 0.0 else 0,
        rows=rows, hidden=hidden, dtype=dtype_code(x), weight_dtype=dtype_code(weight),
        bias_dtype=dtype_code(bias), x_bias_dtype=dtype_code(x_bias), eps=float(eps),
        dropout_p=float(dropout_p), fault_injection=fault_injection(), **launch_kwargs(x))


def layer_norm_bwd(ext, dy, h, weight, mean, rstd, dx, dweight, dbias, dresidual, dx_bias, *, dropout_p, seed):
    """Contract ``layer_norm_bwd`` on ``ext``; dweight/dbias/dx_bias fp32, reduced deterministically."""
    rows, hidden = h.shape
    columns = dweight is not None or dbias is not None or dx_bias is not None
    nbytes = ext.layer_norm_bwd_workspace_bytes(rows=rows, hidden=hidden, need_columns=columns,
                                                need_dx_bias=dx_bias is not None)
    ws = column_workspace(nbytes, h)
    ext.layer_norm_bwd(
        dy=ptr(dy), h=ptr(h), weight=ptr(weight), mean=ptr(mean), rstd=ptr(rstd), dx=ptr(dx),
        dweight=ptr(dweight), dbias=ptr(dbias), dresidual=ptr(dresidual), dx_bias=ptr(dx_bias),
        seed=ptr(seed) if dropout_p > 0.0 else 0, workspace=ptr(ws), workspace_bytes=nbytes, rows=rows,
        hidden=hidden, dtype=dtype_code(h), weight_dtype=dtype_code(weight), dropout_p=float(dropout_p),
        fault_injection=fault_injection(), **launch_kwargs(h))
