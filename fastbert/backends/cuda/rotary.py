"""Rotary-embedding glue of the CUDA C++ backends (``cuda`` and ``cuda-host``): tensors -> raw pointers.

Implements the rotary half of the backend contract (``fastbert.backends``) on the extension's
``rotary_fwd`` / ``rotary_bwd`` (``csrc/rotary_binding.cpp``); ``ext`` is ``fastbert._C`` or
``fastbert._C_host``. The kernel (``csrc/rotary.cu``) rotates q and k in one launch, in fp32, reading
any strides with a contiguous last dim and writing outputs of any such strides, so an output may be
its input (in place); the backward is the same kernel rotating by ``-theta``. The varlen layout
``[total_tokens, heads, head_dim]`` is passed as batch 1, seqlen ``total_tokens``.
"""

from __future__ import annotations

from fastbert.backends.cuda._ext import dtype_code, fault_injection, launch_kwargs, ptr

FEATURES = frozenset({"interleaved", "varlen", "deterministic"})


def _strides(t):
    """(batch, seq, head) element strides of a padded 4-D or varlen 3-D view (batch stride 0)."""
    return tuple(t.stride()[:3]) if t.dim() == 4 else (0, *t.stride()[:2])


def _layout(x, positions):
    batch, seqlen = (x.shape[0], x.shape[1]) if x.dim() == 4 else (1, x.shape[0])
    pos_strides = tuple(positions.stride()) if positions.dim() == 2 else (0, positions.stride(0))
    return dict(batch=batch, seqlen=seqlen, head_dim=x.shape[-1], positions_strides=pos_strides)


def rotary_fwd(ext, q, k, cos, sin, q_out, k_out, *, positions, interleaved):
    """Contract ``rotary_fwd`` on ``ext``: cos/sin fp32 ``[max_positions, rotary_dim / 2]`` contiguous,
    positions int64 ``[batch, seqlen]`` (any strides) or ``[total_tokens]``."""
    ext.rotary_fwd(q=ptr(q), k=ptr(k), cos=ptr(cos), sin=ptr(sin), positions=ptr(positions), q_out=ptr(q_out),
                   k_out=ptr(k_out), q_heads=q.shape[-2], k_heads=k.shape[-2], rotary_dim=2 * cos.shape[1],
                   q_strides=_strides(q), k_strides=_strides(k), q_out_strides=_strides(q_out),
                   k_out_strides=_strides(k_out), dtype=dtype_code(q), interleaved=interleaved,
                   fault_injection=fault_injection(), **_layout(q, positions), **launch_kwargs(q))


def rotary_bwd(ext, dq_out, dk_out, cos, sin, dq, dk, *, positions, interleaved):
    """Contract ``rotary_bwd`` on ``ext``: the inverse rotation of the output gradients."""
    ext.rotary_bwd(dq_out=ptr(dq_out), dk_out=ptr(dk_out), cos=ptr(cos), sin=ptr(sin), positions=ptr(positions),
                   dq=ptr(dq), dk=ptr(dk), q_heads=dq.shape[-2], k_heads=dk.shape[-2], rotary_dim=2 * cos.shape[1],
                   dq_out_strides=_strides(dq_out), dk_out_strides=_strides(dk_out), dq_strides=_strides(dq),
                   dk_strides=_strides(dk), dtype=dtype_code(dq), interleaved=interleaved,
                   fault_injection=fault_injection(), **_layout(dq, positions), **launch_kwargs(dq))
