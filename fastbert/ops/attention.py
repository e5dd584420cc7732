"""Fused masked multi-head attention: validation, dispatch, custom ops and autograd."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastbert.backends import get_backend
from fastbert.ops._common import (FLOAT_DTYPES, EagerOp, allow_tf32, as_float, autocast_dtype, check_dropout_p,
                                  check_tensor, deterministic, draw_seed, new_empty, no_autocast,
                                  no_double_backward, value_checks_enabled)
from fastbert.ops._attention_checks import (_check_cu_seqlens_values, _check_max_seqlen, check_window,
                                           layout_error, padding_mask)
from fastbert.ops._dispatch import backend_module, resolve_call



def _lse_shape(q: Tensor, varlen: bool, backend: str, dropout_p: float = 0.0,
               attn_bias: Optional[Tensor] = None, optional: bool = False, window: bool = False) -> tuple:
    """The forward's softmax statistics, two fp32 planes: the row max ``m`` and ``log(l)`` of the
    row sum (logsumexp = m + log l). Kept apart so that backward's ``exp((s - m) - log l)`` stays
    exact where ``m`` is huge (a row all biased ``finfo.min``: ``m + log l == m`` in fp32).

    ``(0,)`` (no statistics) for a backend declaring ``writes_lse=False``, unless ``optional``
    (the eager fast path) and its compute module's ``writes_lse_for(...)`` says it writes them
    for this call (then backward need not recompute the forward). The custom op never asks:
    its outputs' shapes stay fixed for tracing (inductor failed on the optional statistics)."""
    if not get_backend(backend).caps["attention"].writes_lse:
        if not optional:
            return (0,)
        ask = getattr(backend_module(backend, "attention"), "writes_lse_for", None)
        if ask is None or not ask(device_type=q.device.type, dtype=q.dtype, varlen=varlen,
                                  dropout_p=dropout_p, has_bias=attn_bias is not None, window=window):
            return (0,)
    if varlen:
        return (2, q.shape[1], q.shape[0])  # [2, num_heads, total_tokens]
    return (2, q.shape[0], q.shape[2], q.shape[1])  # [2, batch, num_heads, seqlen_q]


def _bias4d(attn_bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """attn_bias as a stride-0 view ``[batch, num_heads, seqlen_q, seqlen_k]`` (no copy) in a dtype
    every backend reads: an fp64 bias beside fp16/bf16/fp32 q is rounded to fp32 (the accumulation
    dtype), finite values saturating at +-finfo(fp32).max so that a finite bias stays finite
    (``finfo(fp64).min`` is a finite number like ``finfo(fp32).min``; only ``-inf`` excludes a key).
    """
    if attn_bias is None:
        return None
    if attn_bias.dtype == torch.float64 and q.dtype != torch.float64:
        big = torch.finfo(torch.float32).max
        attn_bias = torch.where(attn_bias.isinf(), attn_bias, attn_bias.clamp(-big, big)).float()
    batch, seqlen_q, num_heads, _ = q.shape
    return attn_bias.expand(batch, num_heads, seqlen_q, k.shape[1])


def _window_kw(window_left: int, window_right: int) -> dict:
    """The backends' ``window`` keyword from the custom ops' two ints (``-1`` = no window: global).
    Passed only when set, so a backend that does not declare the feature is called as before."""
    return {} if window_left < 0 else {"window": (int(window_left), int(window_right))}


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
                        attn_bias: Optional[Tensor], cu_seqlens: Optional[Tensor], seed: Optional[Tensor],
                        max_seqlen: int, dropout_p: float, softmax_scale: float, allow_tf32: bool,
                        deterministic: bool, backend: str, window_left: int = -1,
                        window_right: int = -1) -> tuple[Tensor, Tensor]:
    return _attention_fwd_run(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
                              softmax_scale, allow_tf32, deterministic, backend, window_left, window_right,
                              optional_lse=False)


def _attention_fwd_eager(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
                         softmax_scale, allow_tf32, deterministic, backend, window_left=-1, window_right=-1):
    """The eager fast path's forward: also the statistics a backend writes only on request (see
    :func:`_lse_shape`). The custom op (what ``torch.compile`` traces) never asks for them, so
    its fake and real outputs keep one shape whatever the backend module says. A backend's
    ``attention_fwd_functional`` may return fresh outputs instead (tried first, here and not one
    call further down: this runs on every eager call)."""
    if q.numel() and k.numel():
        functional = getattr(backend_module(backend, "attention"), "attention_fwd_functional", None)
        if functional is not None:
            with no_autocast(q):
                res = functional(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
                                 softmax_scale=softmax_scale, allow_tf32=allow_tf32,
                                 deterministic=deterministic, **_window_kw(window_left, window_right))
            if res is not None:
                return res
    return _attention_fwd_run(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
                              softmax_scale, allow_tf32, deterministic, backend, window_left, window_right,
                              optional_lse=True)


def _attention_fwd_run(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
                       softmax_scale, allow_tf32, deterministic, backend, window_left, window_right, *,
                       optional_lse):
    varlen = cu_seqlens is not None
    out = new_empty(q.shape, q.dtype, q.device)
    lse = new_empty(_lse_shape(q, varlen, backend, dropout_p, attn_bias, optional=optional_lse,
                               window=window_left >= 0), torch.float32, q.device)
    if q.numel() == 0 or k.numel() == 0:
        out.zero_()
        if lse.numel():  # empty rows: (m, log l) = (+inf, 0)
            lse[0].fill_(float("inf"))
            lse[1].zero_()
        return out, lse
    with no_autocast(q):
        backend_module(backend, "attention").attention_fwd(
            q, k, v, out, lse, attention_mask=attention_mask, attn_bias=_bias4d(attn_bias, q, k),
            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed,
            softmax_scale=softmax_scale, allow_tf32=allow_tf32, deterministic=deterministic,
            **_window_kw(window_left, window_right))
    return out, lse


_attention_fwd = torch.library.custom_op("fastbert::attention_fwd", mutates_args=())(_attention_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale,
      allow_tf32, deterministic, backend, window_left=-1, window_right=-1):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_lse_shape(q, cu_seqlens is not None, backend), dtype=torch.float32))


def _attention_bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   attention_mask: Optional[Tensor], attn_bias: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], seed: Optional[Tensor], max_seqlen: int,
                   dropout_p: float, softmax_scale: float, allow_tf32: bool, deterministic: bool,
                   bias_requires_grad: bool, backend: str, window_left: int = -1,
                   window_right: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _attention_bwd_run(dout, q, k, v, out, lse, attention_mask, attn_bias, cu_seqlens, seed,
                                           max_seqlen, dropout_p, softmax_scale, allow_tf32, deterministic,
                                           bias_requires_grad, backend, window_left, window_right)
    return dq, dk, dv, (q.new_empty((0,)) if dbias is None else dbias)  # a custom op returns tensors only


def _attention_bwd_run(dout, q, k, v, out, lse, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
                       softmax_scale, allow_tf32, deterministic, bias_requires_grad, backend, window_left=-1,
                       window_right=-1):
    """``(dq, dk, dv, dbias)``, dbias None unless ``bias_requires_grad`` (the eager path's backward:
    no placeholder)."""
    if lse.numel() and not bias_requires_grad:  # statistics from the eager path's forward
        functional = getattr(backend_module(backend, "attention"), "attention_bwd_functional", None)
        if functional is not None:
            with no_autocast(q):
                res = functional(dout.contiguous(), q, k, v, out, lse, attention_mask=attention_mask,
                                 attn_bias=attn_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                 dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale, need_dbias=False,
                                 allow_tf32=allow_tf32, deterministic=deterministic,
                                 **_window_kw(window_left, window_right))
            if res is not None:
                return res + (None,)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(k.shape, k.dtype, k.device)
    dv = new_empty(v.shape, v.dtype, v.device)
    bias4d = _bias4d(attn_bias, q, k)
    # The scores-bias gradient is computed in full ([batch, heads, seqlen_q, seqlen_k] fp32 (fp64
    # for fp64 inputs), the workspace this costs) and reduced here over the broadcast dims, deterministically.
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dbias_full = new_empty(bias4d.shape, acc, q.device) if bias_requires_grad else None
    if q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv) + ((dbias_full,) if bias_requires_grad else ()):
            t.zero_()
    else:
        with no_autocast(q):
            backend_module(backend, "attention").attention_bwd(
                dout.contiguous(), q, k, v, out, lse, dq, dk, dv, dbias_full,
                attention_mask=attention_mask, attn_bias=bias4d, cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                allow_tf32=allow_tf32, deterministic=deterministic,
                **_window_kw(window_left, window_right))
    if not bias_requires_grad:
        return dq, dk, dv, None
    dbias = dbias_full.sum_to_size(attn_bias.shape if attn_bias.dim() == 4 else
                                   (1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    return dq, dk, dv, dbias.reshape(attn_bias.shape).to(attn_bias.dtype)


_attention_bwd = torch.library.custom_op("fastbert::attention_bwd", mutates_args=())(_attention_bwd_impl)
no_double_backward(_attention_bwd, "attention")


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p,
      softmax_scale, allow_tf32, deterministic, bias_requires_grad, backend, window_left=-1, window_right=-1):
    dbias = torch.empty_like(attn_bias) if bias_requires_grad else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale,
     tf32, det, backend, window_left, window_right) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, attn_bias, cu_seqlens, seed)
    ctx.args = (max_seqlen, dropout_p, softmax_scale, tf32, det, backend, window_left, window_right)


def _backward(ctx, dout, dlse, bwd=None):
    q, k, v, out, lse, attention_mask, attn_bias, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, dropout_p, softmax_scale, tf32, det, backend, window_left, window_right = ctx.args
    bias_grad = attn_bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = (bwd or _attention_bwd)(dout, q, k, v, out, lse, attention_mask, attn_bias,
                                       cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale, tf32,
                                       det, bias_grad, backend, window_left, window_right)
    return dq, dk, dv, None, (dbias if bias_grad else None), *_NONES10


_NONES10 = (None,) * 10


def _native(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, max_seqlen, dropout_p, softmax_scale,
            allow_tf32, deterministic, backend, window_left=-1, window_right=-1, backward=True):
    """EagerOp's ``native`` with gradients: ``(out, None)`` from the backend's
    ``attention_fwd_differentiable`` (None where it has none for the call): on the torch backend the
    unmasked or one-call masked flash attention, recorded as aten's own graph (see EagerOp).
    ``backward=False``: the eager forward without gradients (see :func:`_attention_fwd_no_grad`)."""
    fn = getattr(backend_module(backend, "attention"), "attention_fwd_differentiable", None)
    if fn is None or not (q.numel() and k.numel()):
        return None
    window = None if window_left < 0 else (int(window_left), int(window_right))  # (as _window_kw, one call less)
    with no_autocast(q):
        out = fn(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias, cu_seqlens=cu_seqlens,
                 max_seqlen=max_seqlen, dropout_p=dropout_p, seed=seed, softmax_scale=softmax_scale,
                 backward=backward, allow_tf32=allow_tf32, deterministic=deterministic, window=window)
    return None if out is None else (out, None)


def _attention_fwd_no_grad(*inputs):
    """The eager forward without gradients: :func:`_native` where the backend has it for the call
    (on the torch backend also masked plans of several groups, on the forward's cost model), else
    :func:`_attention_fwd_eager`."""
    res = _native(*inputs, backward=False)
    return _attention_fwd_eager(*inputs) if res is None else res


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_eager = EagerOp(_attention_fwd, _attention_fwd_eager, _setup_context, _backward, _attention_bwd,
                 _attention_bwd_run, stats=True, native=_native, no_grad_impl=_attention_fwd_no_grad)


_DEVICE_TYPES = ("cpu", "cuda")
_NO_WINDOW = (-1, -1)  # the custom ops' window_left, window_right for global attention


def attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Optional[Tensor] = None,
              attn_bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
              max_seqlen: Optional[int] = None, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, backend: Optional[str] = None,
              window: Optional[tuple[int, int]] = None) -> Tensor:
    """Masked multi-head scaled dot-product attention, differentiable in q, k, v and attn_bias.

    ``out = dropout(softmax(softmax_scale * q @ k^T + attn_bias, masked)) @ v`` per head
    (Vaswani et al. 2017, eq. 1); kernels tile it with the online softmax (Dao 2023).

    Args:
        q: padded ``(batch, seqlen_q, num_heads, head_dim)`` or varlen
            ``(total_tokens, num_heads, head_dim)``; fp16, bf16, fp32 or fp64. Any strides with a
            contiguous last dim are read in place.
        k, v: like q (padded: ``(batch, seqlen_k, num_heads, head_dim)``; seqlen_k may differ from
            seqlen_q). Same dtype and device as q.
        attention_mask: ``(batch, seqlen_k)``, bool, integer or floating 0/1; nonzero / True =
            attend, 0 = padding (BERT's and Hugging Face's convention, the inverse of torch's
            ``key_padding_mask``). Any strides. Padded layout only.
        attn_bias: additive scores bias broadcastable to ``(batch, num_heads, seqlen_q, seqlen_k)``,
            read in place through stride-0 dims; scores are ``softmax_scale * q @ k^T + attn_bias``.
            Any float dtype, whatever q's: it is read in its own dtype and added in fp32 (fp64 for
            fp64 q), so an fp32 -1e5 bias beside fp16 q stays finite (an fp64 bias beside
            lower-precision q is rounded to fp32, finite values saturating at fp32's range). A
            ``-inf`` entry excludes that key from that row. A ``finfo.min`` bias is a finite number:
            a row whose keys are all biased that way is the exact softmax of its finite scores, as in
            Hugging Face's eager path -- with ``finfo.min`` of fp32 / bf16 / fp64 the scores are equal
            in fp32 and the row averages V; fp16's -65504 or -1e5 leave the row ``softmax(q k^T)``.
            Its gradient costs an fp32 ``(batch, num_heads, seqlen_q, seqlen_k)`` workspace, reduced
            over the broadcast dims deterministically, returned in the bias's dtype. Not supported
            with ``cu_seqlens``.
        cu_seqlens: ``(batch + 1,)`` int32 cumulative sequence lengths for the varlen layout
            (self-attention; zero-length sequences allowed); any strides (the kernels get a
            contiguous copy).
        max_seqlen: an upper bound on the sequence lengths in ``cu_seqlens`` (an int >= the
            longest, as in FlashAttention; a bound above ``total_tokens`` is clamped to it); computed
            when None (one host sync).
        dropout_p: dropout on the attention probabilities, ``0 <= dropout_p < 1``, rounded to a
            multiple of ``2**-16`` (the mask's threshold resolution; ``p < 2**-17`` keeps every
            element) and inverted scaling by ``1 / (1 - p rounded)``; the keep mask comes from the
            shared Philox scheme v2 (``fastbert.backends._philox``) seeded from torch's RNG,
            identical across layouts and backends.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: force a backend (``"reference"``, ``"torch"``, ``"triton"``, ``"cuda"``, ...);
            else ``FASTBERT_BACKEND``, else automatic.
        window: local (sliding-window) attention ``(left, right)``, two ints >= 0 counted in keys,
            inclusive, as a tuple, a list (a JSON config's) or any length-2 sequence; None (the
            default) = global. Query row ``i`` sees key ``j`` iff
            ``i - left <= j <= i + right`` (and ``j`` is not masked / lies in its sequence), with
            ``i`` and ``j`` indices within the sequence: along seqlen_q / seqlen_k in the padded
            layout, offsets from the sequence's ``cu_seqlens`` start in varlen. Aligned top-left
            (index 0 with index 0) also when seqlen_q != seqlen_k; padding does not shift it (a
            left-padded sequence's window is on padded indices, as in Hugging Face's masks).
            ModernBERT's ``local_attention = w`` (``abs(i - j) <= w // 2``) is
            ``window=(w // 2, w // 2)``; ``(0, 0)`` is each row attending its own index only. A
            window wider than the sequence equals global. A row with no key inside its window is
            empty (zeros, zero gradients); the dropout mask is the global one restricted to the
            window (same Philox counters); ``attn_bias``'s gradient is 0 outside the window.

    Returns:
        ``out`` with q's shape and dtype. A query row with no key to attend (every key masked,
        biased ``-inf`` or outside its window) is **empty**: it returns zeros and passes zero
        gradients, never NaN.

    Masked positions: a key masked by ``attention_mask`` (or outside its ``cu_seqlens`` sequence)
    has no influence on anything, whatever its K and V rows and its bias entries hold (NaN, Inf,
    garbage: padding rows of a half-precision model can overflow); it is masked by replacement
    (zero K / V rows, ``-inf`` scores), never by addition, and its dK and dV are exact zeros. A
    ``-inf`` bias excludes a key from one row's softmax only: that key's K and V rows still meet
    the other rows in the same matrix products, so they must be finite.

    Numerics: scores, softmax and products accumulate in fp32 (fp64 for fp64 inputs); P is rounded
    to q's dtype before ``P @ V``.

    Autograd: with gradients, an eager padded fp32/fp16/bf16 call on the torch backend (CPU) without
    bias or dropout, unmasked or with a mask planned as one flash call, records aten's own graph
    (its CPU flash node, as ``F.scaled_dot_product_attention`` does; the masked-row check runs
    first); its second derivative then fails as aten's does. Other calls record fastbert's node.

    Raises:
        TypeError: a non-tensor, a non-float dtype, dtypes that differ, non-int32 cu_seqlens, a
            non-int ``max_seqlen``, a ``window`` that is not None or a length-2 sequence of ints.
        ValueError: a device other than cpu / cuda (meta tensors), wrong ndim, mismatched
            batch/heads/head_dim/seqlen, a mask or bias of the wrong shape, ``attention_mask`` or
            ``attn_bias`` together with ``cu_seqlens``, a negative ``max_seqlen`` (or, for
            CPU tensors, one below the longest sequence), a bad ``dropout_p``, a negative ``window`` entry; for CPU
            tensors (or with ``FASTBERT_CHECK_INPUTS=1``) also
            ``cu_seqlens`` values that are not non-decreasing from 0 to ``total_tokens``. The fast
            GPU path trusts tensor values.
        RuntimeError: a forced backend cannot take the call (every reason is listed).
    """
    varlen = cu_seqlens is not None
    ndim = 3 if varlen else 4
    try:
        check_tensor("q", q, ndim=ndim, dtypes=FLOAT_DTYPES)
    except ValueError as exc:  # the wrong ndim: say which layout q's ndim is
        raise layout_error(exc, q, varlen) from None
    device = q.device  # read once: each .device builds a torch.device
    dev_type = "cpu" if q.is_cpu else device.type  # (.type builds a str: ~1 us, is_cpu ~0.1)
    if dev_type not in _DEVICE_TYPES:
        raise ValueError(f"q: expected a tensor on one of {list(_DEVICE_TYPES)}, got device {device} (meta tensors "
                         "have no values to attend; under torch.compile fake tensors take the fake implementation)")
    check_tensor("k", k, ndim=ndim, device=device)
    check_tensor("v", v, ndim=ndim, device=device)
    dtype = q.dtype
    if not (k.dtype == dtype and v.dtype == dtype):
        raise TypeError(f"k, v: expected q's dtype {dtype}, got k {k.dtype} and v {v.dtype}")
    qs, ks, vs = q.shape, k.shape, v.shape  # read once: each .shape builds a torch.Size
    hd, heads = qs[-1], qs[-2]
    if not (ks[-2] == heads and vs[-2] == heads):
        raise ValueError(f"num_heads: expected q, k, v to agree, got q {heads}, k {ks[-2]}, v {vs[-2]}")
    if not (ks[-1] == hd and vs[-1] == hd):
        raise ValueError(f"head_dim: expected q, k, v to agree, got q {hd}, k {ks[-1]}, v {vs[-1]}")
    if hd <= 0:
        raise ValueError(f"head_dim: expected > 0, got {hd}")
    if ks[0] != vs[0] or (not varlen and ks[1] != vs[1]):  # ks[:-2] != vs[:-2], without building Sizes
        raise ValueError(f"k, v: expected the same leading shape, got k {tuple(ks)} and v {tuple(vs)}")
    if type(dropout_p) is not float or dropout_p != 0.0:  # (the default 0.0 needs no check: one call less)
        dropout_p = check_dropout_p(dropout_p)
    if varlen:
        if attention_mask is not None:
            raise ValueError("attention_mask: must be None with cu_seqlens (the varlen layout has no padding)")
        if attn_bias is not None:
            raise ValueError("attn_bias: not supported with cu_seqlens (use the padded layout)")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens: expected batch + 1 >= 1 entries, got 0")
        if ks[0] != qs[0]:
            raise ValueError(f"k: varlen is self-attention, expected total_tokens {qs[0]}, got {ks[0]}")
        if max_seqlen is not None:
            max_seqlen = _check_max_seqlen(max_seqlen, qs[0])
        # Backends read cu_seqlens as a flat int32 array: one contiguous copy here serves them all
        # (a strided view is read through its strides by .tolist(), then as raw memory by a kernel).
        cu_seqlens = cu_seqlens.contiguous()
        if value_checks_enabled(cu_seqlens):
            _check_cu_seqlens_values(cu_seqlens, qs[0], max_seqlen)
        if max_seqlen is None:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_seqlen = int(lengths.max().item()) if lengths.numel() else 0  # one host sync
    else:
        if ks[0] != qs[0]:
            raise ValueError(f"k: expected batch {qs[0]}, got {ks[0]}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful with cu_seqlens")
        batch, seqlen_k = qs[0], ks[1]
        if attention_mask is not None:
            attention_mask = padding_mask(attention_mask, batch, seqlen_k, device, seqlen_name="seqlen_k")
        if attn_bias is not None:
            check_tensor("attn_bias", attn_bias, dtypes=FLOAT_DTYPES, device=device)
            full = (batch, heads, qs[1], seqlen_k)
            ok = attn_bias.dim() <= 4 and all(
                s in (1, f) for s, f in zip(reversed(attn_bias.shape), reversed(full)))
            if not ok:
                raise ValueError(f"attn_bias: expected a shape broadcastable to (batch, num_heads, "
                                 f"seqlen_q, seqlen_k) = {full}, got {tuple(attn_bias.shape)}")
    if q.stride()[-1] != 1:  # (stride() then [-1]: half the cost of stride(-1))
        q = q.contiguous()
    if k.stride()[-1] != 1:
        k = k.contiguous()
    if v.stride()[-1] != 1:
        v = v.contiguous()
    ac = autocast_dtype(dev_type)
    if ac is not None:  # attention runs in the autocast dtype
        # attn_bias keeps its dtype: it is added in fp32 (an fp32 -1e5 bias would be -inf in fp16).
        q, k, v = q.to(ac), k.to(ac), v.to(ac)
    softmax_scale = 1.0 / math.sqrt(hd) if softmax_scale is None else as_float("softmax_scale", softmax_scale)
    if not softmax_scale - softmax_scale == 0.0:  # NaN or +-inf (math.isfinite does not trace)
        raise ValueError(f"softmax_scale: expected a finite number, got {softmax_scale}")
    if window is not None:
        window = check_window(window, *((max_seqlen, max_seqlen) if varlen else (qs[1], ks[1])))
    features = ("window",) if window is not None else ()
    if attention_mask is not None:
        features += ("attention_mask",)
    if attn_bias is not None:
        features += ("attn_bias", "attn_bias_grad") if attn_bias.requires_grad else ("attn_bias",)
    if varlen:
        features += ("varlen",)
    if dropout_p > 0.0:
        features += ("dropout",)
    det, tf32 = deterministic(), dev_type == "cuda" and allow_tf32(q)
    if det:
        features += ("deterministic",)
    if tf32:
        features += ("tf32",)
    name = resolve_call("attention", dev_type, q.dtype, hd, features, backend)  # q.dtype: autocast may have cast q
    seed = draw_seed(device) if dropout_p > 0.0 else None
    out, _ = _eager(q, k, v, attention_mask, attn_bias, cu_seqlens, seed, int(max_seqlen or 0),
                    dropout_p, float(softmax_scale), tf32, det, name,
                    *(window if window is not None else _NO_WINDOW), diff=(q, k, v, attn_bias))
    return out
