"""Glue between the backend contract and the CUDA C++ extensions (``fastbert._C`` on GPUs,
``fastbert._C_host`` on the CPU): loading, the raw-pointer calling convention, LayerNorm and GELU.

The extensions take pointers and sizes as ints, dtypes as codes, the CUDA stream and device as
ints, and never allocate; the only allocation here is the fp32 workspace of the deterministic
column reductions (from torch's allocator, so it is graph-safe). Attention's glue lives in
``fastbert.backends._cuda_attention`` and reuses the helpers below (see csrc/README.md).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from fastbert.backends import workspace

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EXTENSIONS = ("_C", "_C_host")

_loaded: dict[str, ModuleType | str] = {}


def load_extension(name: str) -> ModuleType | str:
    """``fastbert._C`` / ``fastbert._C_host`` (loaded once), or why it cannot be used."""
    if name not in _loaded:
        import fastbert

        try:
            ext = importlib.import_module(f"fastbert.{name}")
        except ImportError as exc:
            how = ("no nvcc (CUDA >= 12) at install time or FASTBERT_BUILD_CUDA=0" if name == "_C"
                   else "no C++20 compiler at install time or FASTBERT_BUILD_HOST=0")
            _loaded[name] = f"fastbert.{name} is not built ({how}; reinstall with pip install .): {exc}"
        else:
            built = ext.version()
            _loaded[name] = ext if built == fastbert.__version__ else (
                f"fastbert.{name} was built for fastbert {built} but this is fastbert "
                f"{fastbert.__version__}: rebuild it (pip install .)")
    return _loaded[name]


def ptr(t: torch.Tensor | None) -> int:
    """The tensor's data pointer as an int, 0 for None."""
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor | None) -> int:
    """The extension's dtype code of ``t`` (0 for None)."""
    return 0 if t is None else DTYPE_CODES[t.dtype]


def launch_kwargs(t: torch.Tensor) -> dict:
    """``stream`` and ``device`` for a launch on ``t``'s device: torch's current stream on a GPU,
    (0, -1) for CPU tensors (the host build)."""
    if t.is_cuda:
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream, "device": t.device.index}
    return {"stream": 0, "device": -1}


def fault_injection() -> int:
    """The planted-bug switch ``FASTBERT_CUDA_FAULT`` (0 = off; csrc/README.md), read per call."""
    return int(os.environ.get("FASTBERT_CUDA_FAULT", "0") or 0)


def _workspace(nbytes: int, like: torch.Tensor) -> torch.Tensor | None:
    return workspace((((nbytes + 15) // 16) * 4,), torch.float32, like.device) if nbytes else None


# ----------------------------------------------------------------------------------------------
# LayerNorm and GELU (the backend contract of fastbert.backends, bound to an extension)
# ----------------------------------------------------------------------------------------------


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
    ws = _workspace(nbytes, h)
    ext.layer_norm_bwd(
        dy=ptr(dy), h=ptr(h), weight=ptr(weight), mean=ptr(mean), rstd=ptr(rstd), dx=ptr(dx),
        dweight=ptr(dweight), dbias=ptr(dbias), dresidual=ptr(dresidual), dx_bias=ptr(dx_bias),
        seed=ptr(seed) if dropout_p > 0.0 else 0, workspace=ptr(ws), workspace_bytes=nbytes, rows=rows,
        hidden=hidden, dtype=dtype_code(h), weight_dtype=dtype_code(weight), dropout_p=float(dropout_p),
        fault_injection=fault_injection(), **launch_kwargs(h))


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
    ws = _workspace(nbytes, x)
    ext.gelu_bwd(dy=ptr(dy), x=ptr(x), bias=ptr(bias), dx=ptr(dx), dbias=ptr(dbias), workspace=ptr(ws),
                 workspace_bytes=nbytes, rows=rows, hidden=hidden, dtype=dtype_code(x),
                 bias_dtype=dtype_code(bias), approximate=approximate, fault_injection=fault_injection(),
                 **launch_kwargs(x))


def _attention_missing(*args, **kwargs):
    raise NotImplementedError("the CUDA attention kernels are not built into this fastbert")


def bind(name: str) -> dict:
    """The six contract functions bound to extension ``name``; ImportError when it is unusable."""
    ext = load_extension(name)
    if isinstance(ext, str):
        raise ImportError(ext)
    funcs = {f.__name__: functools.partial(f, ext) for f in (layer_norm_fwd, layer_norm_bwd, gelu_fwd, gelu_bwd)}
    try:
        attn = importlib.import_module("fastbert.backends._cuda_attention")
        funcs["attention_fwd"] = functools.partial(attn.attention_fwd, ext)
        funcs["attention_bwd"] = functools.partial(attn.attention_bwd, ext)
    except ModuleNotFoundError as exc:
        if exc.name != "fastbert.backends._cuda_attention":
            raise
        funcs["attention_fwd"] = funcs["attention_bwd"] = _attention_missing
    return funcs
