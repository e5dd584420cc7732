"""Triton fused masked multi-head attention: the ``triton`` backend's entry points for attention.

The kernels live in three modules, as in csrc: :mod:`._attention_common` (layouts, features,
the program prologue, tile helpers, the config table and the shared launch arguments),
:mod:`._attention_fwd` (the FlashAttention-2 forward, Dao 2023 Algorithm 1) and
:mod:`._attention_bwd` (the two-pass deterministic backward, Algorithm 2). This module holds the
backend entry points (:func:`attention_fwd`, :func:`attention_bwd`; contract in
:mod:`fastbert.backends`) and the ahead-of-time compile variants (:func:`aot_variants`).
"""

from __future__ import annotations

import torch

from fastbert.backends import workspace

# The kernels, launchers and config table are re-exported here, where callers (tests, bench/tune.py,
# benchmarks, the AOT gate) have always found them; the entry points launch through these names.
from fastbert.backends.triton._attention_bwd import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,  # noqa: F401
                                                     _attn_bwd_preprocess_kernel, bwd_launches)
from fastbert.backends.triton._attention_common import (INTERPRET, LOG2E, attention_config,  # noqa: F401
                                                        head_dim_bucket)
from fastbert.backends.triton._attention_fwd import _attn_fwd_kernel, fwd_launch
from fastbert.backends.triton._common import device_ctx as _device_ctx


def attention_fwd(q, k, v, out, lse, *, attention_mask, attn_bias, cu_seqlens, max_seqlen,
                  dropout_p, seed, softmax_scale, allow_tf32=False, deterministic=False, window=None):
    """Backend entry point (contract in :mod:`fastbert.backends`): writes ``out`` and ``lse``.

    ``window``: None (global) or ``(left, right)`` Python ints >= 0: query i sees key j iff
    ``i - left <= j <= i + right`` (positions within the sequence, top-left aligned when seqlen_q
    != seqlen_k); key tiles outside every row's window are skipped.
    """
    grid, kw = fwd_launch(q, k, v, out, lse, attention_mask=attention_mask, attn_bias=attn_bias,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                          softmax_scale=softmax_scale, allow_tf32=allow_tf32, window=window)
    if grid[0] * grid[1] == 0:
        return
    with _device_ctx(q):
        _attn_fwd_kernel[grid](**kw)


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, dbias, *, attention_mask, attn_bias,
                  cu_seqlens, max_seqlen, dropout_p, seed, softmax_scale, allow_tf32=False,
                  deterministic=False, window=None):
    """Backend entry point: writes dq, dk, dv and, when ``dbias`` is given, the full fp32
    ``[batch, num_heads, seqlen_q, seqlen_k]`` scores-bias gradient (zero outside the window).

    Deterministic always (every output element has one owner, no atomics), so
    ``deterministic=True`` needs nothing extra. Workspace: ``delta``, fp32 like one plane of ``lse``.
    """
    delta = workspace(lse.shape[1:], torch.float32, lse.device)  # like one plane of lse
    if window is not None and dbias is not None:
        dbias.zero_()  # the dK/dV kernel writes only the query tiles that see its keys
    launches = bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias, delta,
                            attention_mask=attention_mask, attn_bias=attn_bias, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                            softmax_scale=softmax_scale, allow_tf32=allow_tf32, window=window)
    with _device_ctx(q):
        for kernel, grid, kw in launches:
            if grid[0] * grid[1] == 0:
                return
            kernel[grid](**kw)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (fastbert.backends.triton._aot; gate: tests/test_triton_aot_attention.py)
# ----------------------------------------------------------------------------------------------

# CI compiles the highest-pressure variant (padded, every feature on, the window included) at
# head_dim 128, the widest bucket the zero-spill gate covers and the tightest tiles of the table,
# in fp16 and bf16 (bf16 also covers the compiled bf16 tl.dot, which the interpreter cannot run).
# The full matrix (``full=True``, ``-m slow``) adds the other buckets, fp32 (slow to compile: IEEE
# fp32 tl.dot lowers to FMAs), the non-power-of-two head_dims, the varlen layout and TF32.
AOT_CI = tuple((dt, 128) for dt in (torch.float16, torch.bfloat16))
AOT_FULL_HEAD_DIMS = (8, 16, 24, 32, 40, 64, 80, 96, 128, 200, 256)
# Spill budgets (bytes of spill stores + loads, per launch name, dtype and head_dim bucket) where
# zero is not reached: 1.5x the largest value ptxas reported (Triton 3.9, sm_80 and sm_90, every
# head_dim and layout of the bucket), rounded up to 64. Zero everywhere else; fp16/bf16 up to
# head_dim 128 must stay at zero (the gate). fp32 is IEEE FMA tl.dot: big per-thread tiles.
AOT_SPILL_BUDGETS: dict[tuple[str, str, int], int] = {
    ("bwd_dkdv", "float32", 64): 128,  # observed 80
    ("bwd_dkdv", "float32", 128): 1792,  # observed 1180
    ("bwd_dkdv", "float32", 256): 1728,  # observed 1120
    ("bwd_dq", "bfloat16", 256): 64,  # observed 8
    ("bwd_dq", "float16", 256): 64,  # observed 8
    ("bwd_dq", "float32", 256): 64,  # observed 40
    ("fwd", "float32", 32): 256,  # observed 160
    ("fwd", "float32", 64): 64,  # observed 32
    ("fwd", "float32", 128): 1664,  # observed 1092
    ("fwd", "float32", 256): 64,  # observed 32
}


def _aot_spill_budget(kind: str, dtype: torch.dtype, head_dim: int) -> int:
    return AOT_SPILL_BUDGETS.get((kind, str(dtype).replace("torch.", ""), head_dim_bucket(head_dim)), 0)


def aot_launches(dtype: torch.dtype, head_dim: int, *, varlen: bool = False,
                 allow_tf32: bool = False, dropout: bool = True, window: bool = False, batch: int = 4,
                 seqlen: int = 512, num_heads: int = 12):
    """``[(label, kernel, kwargs)]`` of every attention launch for one configuration, built by the
    launchers' own argument builders from meta tensors (data_ptr 0: 16-byte aligned, like torch's
    allocations). Padded: mask, bias with gradient, dropout; varlen: dropout; ``window``: a local
    window too (its sizes are runtime ints, not specialized: one compile serves every window)."""
    meta = dict(device="meta")
    tokens = (batch * seqlen,) if varlen else (batch, seqlen)
    qkv = torch.empty(*tokens, 3, num_heads, head_dim, dtype=dtype, **meta)  # q, k, v read in place
    q, k, v = qkv.unbind(-3)
    out, dout = torch.empty_like(q), torch.empty_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if varlen:
        lse = torch.empty(2, num_heads, batch * seqlen, dtype=torch.float32, **meta)
        kw = dict(attention_mask=None, attn_bias=None, max_seqlen=seqlen,
                  cu_seqlens=torch.empty(batch + 1, dtype=torch.int32, **meta))
        dbias = None
    else:
        lse = torch.empty(2, batch, num_heads, seqlen, dtype=torch.float32, **meta)
        bias = torch.empty(batch, num_heads, seqlen, seqlen, dtype=dtype, **meta)
        kw = dict(attention_mask=torch.empty(batch, seqlen, dtype=torch.bool, **meta), attn_bias=bias,
                  cu_seqlens=None, max_seqlen=None)
        dbias = torch.empty(bias.shape, dtype=torch.float32, **meta)
    kw.update(dropout_p=0.1 if dropout else 0.0, seed=torch.empty(2, dtype=torch.int64, **meta),
              softmax_scale=head_dim ** -0.5, allow_tf32=allow_tf32, window=(64, 64) if window else None)
    _, fkw = fwd_launch(q, k, v, out, lse, **kw)
    launches = [("fwd", _attn_fwd_kernel, fkw)]
    names = ("bwd_preprocess", "bwd_dkdv", "bwd_dq")
    for name, (kernel, _, bkw) in zip(names, bwd_launches(dout, q, k, v, out, lse, dq, dk, dv, dbias,
                                                          torch.empty_like(lse[0]), **kw)):
        launches.append((name, kernel, bkw))
    return launches


def aot_variants(full: bool = False):
    """Ahead-of-time compile variants: the highest-pressure variant of each kernel (padded layout,
    every feature on: mask, bias with gradient, dropout, local window) for :data:`AOT_CI`; ``full``
    compiles every head_dim bucket and dtype, the non-power-of-two head_dims, the varlen layout
    (dropout, no window: the unpadded BERT encoder's path) and the preprocess kernel. One config
    table serves sm_80 and sm_90, so each variant is compiled for both."""
    from fastbert.backends.triton._aot import AotVariant, split_launch

    if full:
        configs = [(dt, hd, varlen, False) for dt in (torch.float16, torch.bfloat16, torch.float32)
                   for hd in AOT_FULL_HEAD_DIMS for varlen in (False, True)]
        configs += [(torch.float32, hd, False, True) for hd in (64, 128)]  # the TF32 tl.dot
    else:
        configs = [(dt, hd, False, False) for dt, hd in AOT_CI]
    out = []
    for dtype, head_dim, varlen, tf32 in configs:
        window = not varlen  # the window joins the highest-pressure (padded) variant
        for kind, kernel, kw in aot_launches(dtype, head_dim, varlen=varlen, allow_tf32=tf32, window=window):
            if kind == "bwd_preprocess" and not full:
                continue  # a row reduction: no register pressure to gate
            label = (f"attention_{kind} {str(dtype)[6:]} d={head_dim}{' varlen' if varlen else ''}"
                     f"{' window' if window else ''}{' tf32' if tf32 else ''}")
            out.append(AotVariant(label, kernel, *split_launch(kernel, kw),
                                  spill_budget=_aot_spill_budget(kind, dtype, head_dim)))
    return out
