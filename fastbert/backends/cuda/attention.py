"""Attention glue of the CUDA C++ backends (``cuda`` and ``cuda-host``): tensors -> raw pointers.

Implements the attention half of the backend contract (``fastbert.backends``) on top of the
extension's ``attention_fwd`` / ``attention_bwd`` (``csrc/attention_binding.cpp``), for either
module: ``ext`` is ``fastbert._C`` (device pointers, torch's current stream) or
``fastbert._C_host`` (CPU pointers, the same kernels run on CPU fibers). Nothing is allocated and
nothing is synchronised here; ``fastbert.ops`` allocated every output.

The kernels (``csrc/attention_fwd.cu``, ``csrc/attention_bwd.cu``): FlashAttention-2 tiling (Dao
2023) with ``mma.sync`` tensor cores for fp16/bf16 and a plain fp32 path; head_dim in buckets of
64/128/256 with the padded lanes masked, so every multiple of 8 up to 256 runs; a deterministic
backward (no atomics: one kernel owns dq and dbias, another dk and dv) without workspace. A
sliding ``window=(left, right)`` (query i sees keys i - left .. i + right, positions within the
sequence) makes every kernel walk only the key / query tiles the window reaches, so its cost grows
with seqlen x window; it is a runtime argument (no extra kernel instantiations).
"""

from __future__ import annotations

import torch

from fastbert.backends import ALL_FEATURES, WINDOW_FEATURE
from fastbert.backends.cuda._ext import dtype_code, fault_injection, launch_kwargs, ptr

# head_dims the kernels take (one list for capabilities, tests and docs).
HEAD_DIMS = tuple(range(8, 257, 8))
HEAD_DIMS_DOC = "multiples of 8 up to 256"
# Every attention feature; "tf32" is accepted and computed in IEEE fp32 (the plain fp32 path).
FEATURES = ALL_FEATURES & frozenset({"attention_mask", "attn_bias", "attn_bias_grad", "varlen", "dropout",
                                     "deterministic", "tf32"}) | {WINDOW_FEATURE}
# The binding's "no bound on this side" (csrc/attention_binding.cpp).
_UNBOUNDED = -1
WRITES_LSE = True


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(stride_batch, stride_seq, stride_head) in elements; varlen rows have no batch stride."""
    if varlen:  # [total_tokens, num_heads, head_dim]
        return (0, t.stride(0), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))  # [batch, seqlen, num_heads, head_dim]


def _kernel_bias(attn_bias):
    """The bias as the kernels read it (fp32/fp16/bf16): an fp64 bias becomes an fp32 copy, which
    the caller must hold until the launch returns (the extension sees only its pointer; on a GPU
    torch's caching allocator then reuses the block only for work queued after the kernel on the
    same stream)."""
    return attn_bias.float() if attn_bias is not None and attn_bias.dtype == torch.float64 else attn_bias


def _bias_args(attn_bias) -> dict:
    if attn_bias is None:
        return dict(attn_bias=0, bias_dtype=0, bias_strides=(0, 0, 0, 0))
    return dict(attn_bias=ptr(attn_bias), bias_dtype=dtype_code(attn_bias), bias_strides=tuple(attn_bias.stride()))


def _window_args(window) -> dict:
    """``window`` (None or (left, right) ints >= 0, checked and clamped to the sequence lengths by
    ``fastbert.ops``) as the binding's ``window_left`` / ``window_right`` (-1 = unbounded). The
    binding clamps any int64 bound to the sequence again, for direct calls."""
    if window is None:
        return dict(window_left=_UNBOUNDED, window_right=_UNBOUNDED)
    left, right = window
    return dict(window_left=int(left), window_right=int(right))


def _common(q, k, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
            softmax_scale, window) -> dict:
    varlen = cu_seqlens is not None
    if varlen:
        batch, num_heads, head_dim = cu_seqlens.numel() - 1, q.shape[1], q.shape[2]
        seqlen_q = seqlen_k = int(max_seqlen)
        lse_strides = (lse.stride(0), 0, lse.stride(1))  # [2, num_heads, total_tokens]
    else:
        batch, seqlen_q, num_heads, head_dim = q.shape
        seqlen_k = k.shape[1]
        lse_strides = lse.stride()[:3]  # [2, batch, num_heads, seqlen_q]
    mask = attention_mask
    return dict(
        lse=ptr(lse), lse_strides=lse_strides,
        cu_seqlens=ptr(cu_seqlens) if varlen else 0,
        attention_mask=ptr(mask) if mask is not None else 0,
        mask_strides=tuple(mask.stride()) if mask is not None else (0, 0),
        **_bias_args(attn_bias),
        seed=ptr(seed) if (seed is not None and dropout_p > 0.0) else 0,
        batch=batch, num_heads=num_heads, head_dim=head_dim, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        dtype=dtype_code(q), dropout_p=float(dropout_p), softmax_scale=float(softmax_scale),
        **_window_args(window), fault_injection=fault_injection(), **launch_kwargs(q))


def _check_layout(lse: torch.Tensor, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention: expected a contiguous last dim, got strides {t.stride()}")
    if lse.stride(-1) != 1:
        raise ValueError(f"lse: expected a contiguous last dim, got strides {lse.stride()}")


def attention_fwd(ext, q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen, dropout_p, seed,
                  softmax_scale, allow_tf32=False, deterministic=False, window=None) -> None:
    """Backend entry point (``fastbert.backends``): writes ``out`` and ``lse`` through ``ext``."""
    varlen = cu_seqlens is not None
    _check_layout(lse, q, k, v, out)
    if varlen and int(max_seqlen) == 0:  # only empty sequences: nothing to compute
        return
    attn_bias = _kernel_bias(attn_bias)  # held until the launch returns
    ext.attention_fwd(
        q=ptr(q), q_strides=_strides3(q, varlen), k=ptr(k), k_strides=_strides3(k, varlen),
        v=ptr(v), v_strides=_strides3(v, varlen), out=ptr(out), out_strides=_strides3(out, varlen),
        **_common(q, k, out, lse, attention_mask=attention_mask, attn_bias=attn_bias, cu_seqlens=cu_seqlens,
                  max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                  window=window))


def attention_bwd(ext, dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias, cu_seqlens,
                  max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False,
                  window=None) -> None:
    """Backend entry point: writes dq, dk, dv and (when ``dbias`` is given) the full fp32 dbias."""
    varlen = cu_seqlens is not None
    _check_layout(lse, dout, q, k, v, out, dq, dk, dv)
    if varlen and int(max_seqlen) == 0:
        return
    if dbias is not None and dbias.dtype != torch.float32:
        raise ValueError(f"dbias: expected float32, got {dbias.dtype}")
    attn_bias = _kernel_bias(attn_bias)  # held until the launch returns
    ext.attention_bwd(
        dout=ptr(dout), dout_strides=_strides3(dout, varlen), q=ptr(q), q_strides=_strides3(q, varlen),
        k=ptr(k), k_strides=_strides3(k, varlen), v=ptr(v), v_strides=_strides3(v, varlen),
        out=ptr(out), out_strides=_strides3(out, varlen), dq=ptr(dq), dq_strides=_strides3(dq, varlen),
        dk=ptr(dk), dk_strides=_strides3(dk, varlen), dv=ptr(dv), dv_strides=_strides3(dv, varlen),
        dbias=ptr(dbias) if dbias is not None else 0,
        dbias_strides=tuple(dbias.stride()) if dbias is not None else (0, 0, 0, 0),
        **_common(q, k, out, lse, attention_mask=attention_mask, attn_bias=attn_bias, cu_seqlens=cu_seqlens,
                  max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                  window=window))
