"""Rotary position embeddings (RoPE) on q and k: validation, positions, dispatch, custom ops, autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbert.backends import CallInfo
from fastbert.ops._common import (FLOAT_DTYPES, check, check_tensor, new_empty, no_autocast, no_double_backward,
                                  value_checks_enabled)
from fastbert.ops._dispatch import backend_module, resolve
from fastbert.ops._attention_checks import _check_cu_seqlens_values

_INT_DTYPES = (torch.int32, torch.int64)


@torch.library.custom_op("fastbert::rotary_fwd", mutates_args=())
def _rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    q_out, k_out = new_empty(q.shape, q.dtype, q.device), new_empty(k.shape, k.dtype, k.device)
    if q.numel() or k.numel():
        with no_autocast(q.device.type):
            backend_module(backend, "rotary").rotary_fwd(q, k, cos, sin, q_out, k_out, positions=positions,
                                                 interleaved=interleaved)
    return q_out, k_out


@_rotary_fwd.register_fake
def _(q, k, cos, sin, positions, interleaved, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("fastbert::rotary_bwd", mutates_args=())
def _rotary_bwd(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    dq, dk = new_empty(dq_out.shape, dq_out.dtype, dq_out.device), new_empty(dk_out.shape, dk_out.dtype, dk_out.device)
    if dq.numel() or dk.numel():
        with no_autocast(dq.device.type):
            backend_module(backend, "rotary").rotary_bwd(dq_out.contiguous(), dk_out.contiguous(), cos, sin, dq, dk,
                                                 positions=positions, interleaved=interleaved)
    return dq, dk


no_double_backward(_rotary_bwd, "rotary")


@_rotary_bwd.register_fake
def _(dq_out, dk_out, cos, sin, positions, interleaved, backend):
    return (torch.empty_like(dq_out, memory_format=torch.contiguous_format),
            torch.empty_like(dk_out, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.args = (interleaved, backend)


def _backward(ctx, dq_out, dk_out):
    cos, sin, positions = ctx.saved_tensors
    interleaved, backend = ctx.args
    dq, dk = _rotary_bwd(dq_out, dk_out, cos, sin, positions, interleaved, backend)
    return dq, dk, None, None, None, None, None


_rotary_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastbert::rotary_fwd_", mutates_args=("q", "k"))
def _rotary_fwd_inplace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
                        backend: str) -> None:
    """``rotary_fwd`` with the outputs in q's and k's own storage (every backend's entry point takes
    ``q_out is q``)."""
    if q.numel() or k.numel():
        with no_autocast(q.device.type):
            backend_module(backend, "rotary").rotary_fwd(q, k, cos, sin, q, k, positions=positions,
                                                 interleaved=interleaved)


@_rotary_fwd_inplace.register_fake
def _(q, k, cos, sin, positions, interleaved, backend):
    return None


def _grad_one(dx_out: Tensor, ctx, which: int) -> Tensor:
    """``R(-theta) dx_out`` through the functional backward op, the other tensor given 0 heads."""
    cos, sin, positions = ctx.saved_tensors
    interleaved, backend = ctx.args
    none = dx_out[..., :0, :]
    pair = (dx_out, none) if which == 0 else (none, dx_out)
    return _rotary_bwd(*pair, cos, sin, positions, interleaved, backend)[which]


class _RotaryInplaceQ(torch.autograd.Function):
    """Autograd of the in-place op, q's half (a mutating custom op cannot register autograd itself,
    and autograd lets a Function that modifies a view in place return only that one tensor). One
    launch rotates q and k (k rides in a list: this node gives it no gradient); q is marked dirty,
    so autograd rebases its history here (a view's base too). Saves the tables and positions only."""

    @staticmethod
    def forward(ctx, q, k_box, cos, sin, positions, interleaved, backend):
        _rotary_fwd_inplace(q, k_box[0], cos, sin, positions, interleaved, backend)
        ctx.mark_dirty(q)
        ctx.save_for_backward(cos, sin, positions)
        ctx.args = (interleaved, backend)
        return q

    @staticmethod
    def backward(ctx, dq_out):
        return _grad_one(dq_out, ctx, 0), None, None, None, None, None, None


class _RotaryInplaceK(torch.autograd.Function):
    """k's half: k was rotated by :class:`_RotaryInplaceQ`'s launch; this node marks it dirty and
    gives it the inverse rotation as gradient."""

    @staticmethod
    def forward(ctx, k, cos, sin, positions, interleaved, backend):
        ctx.mark_dirty(k)
        ctx.save_for_backward(cos, sin, positions)
        ctx.args = (interleaved, backend)
        return k

    @staticmethod
    def backward(ctx, dk_out):
        return _grad_one(dk_out, ctx, 1), None, None, None, None, None


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may address a common storage element, from metadata only.

    ``torch._C._overlaps`` compares memory ranges, so it flags q and k taken from one fused QKV
    output (interleaved ranges, disjoint elements). For equal shapes and strides in a nested layout
    (each stride at least the next one's extent: no internal overlap) the answer is exact: they share
    an element iff the offset difference is ``sum_i n_i stride_i`` with ``|n_i| < size_i``, where
    nesting leaves each ``n_i`` the floor or the ceiling of the residual over ``stride_i``. Anything
    else stays conservative (True when the ranges meet)."""
    if not torch._C._overlaps(a, b):
        return False
    if a.shape != b.shape or a.stride() != b.stride():
        return True
    dims = sorted(((st, n) for st, n in zip(a.stride(), a.shape) if n > 1), reverse=True)
    if any(s0 < s1 * n1 for (s0, _), (s1, n1) in zip(dims, dims[1:])):
        return True

    def reachable(d: int, i: int) -> bool:
        if i == len(dims):
            return d == 0
        st, n = dims[i]
        return any(abs(m) < n and reachable(d - m * st, i + 1) for m in {d // st, -(-d // st)})

    return reachable(b.storage_offset() - a.storage_offset(), 0)


def _check_inplace(q: Tensor, k: Tensor) -> None:
    """The layouts ``inplace=True`` can rotate in their own storage (the memory-overlap checks read
    storage addresses, so they run in eager mode only; Dynamo cannot trace them)."""
    compiling = torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k)):
        check(t.stride(-1) == 1, ValueError,
              f"{name}: inplace=True needs a contiguous last dim (stride 1), got strides {tuple(t.stride())}")
        check(compiling or torch._debug_has_internal_overlap(t) != 1, ValueError,
              f"{name}: inplace=True cannot write a tensor whose elements share memory (an expanded view, "
              f"strides {tuple(t.stride())}); pass inplace=False")
        check(not (t.is_leaf and t.requires_grad and torch.is_grad_enabled()), ValueError,
              f"{name}: inplace=True would overwrite a leaf that requires grad (autograd forbids it); pass "
              "inplace=False or a non-leaf (e.g. the projection's output view)")
    check(compiling or not (q.numel() and k.numel() and _share_elements(q, k)), ValueError,
          "q, k: inplace=True needs q and k in disjoint memory, got overlapping tensors (the same storage "
          "elements); pass inplace=False")


def _positions(q: Tensor, position_ids: Optional[Tensor], cu_seqlens: Optional[Tensor], max_positions: int) -> Tensor:
    """Each token's table row as int64: ``[batch, seqlen]`` (padded; stride 0 where broadcast) or
    ``[total_tokens]`` (varlen). No host sync: ``cu_seqlens`` becomes ``t - cu_seqlens[seq(t)]``."""
    check_v = value_checks_enabled(q, position_ids, cu_seqlens)
    if q.dim() == 4:
        batch, seqlen = q.shape[:2]
        check(cu_seqlens is None, ValueError,
              "cu_seqlens: only for the varlen layout (q of 3 dims), got q of 4 dims (batch, seqlen, heads, head_dim)")
        if position_ids is None:
            check(seqlen <= max_positions, ValueError,
                  f"cos, sin: expected at least seqlen = {seqlen} rows (positions 0..seqlen-1), got {max_positions}")
            return torch.arange(seqlen, device=q.device).expand(batch, seqlen)
        check_tensor("position_ids", position_ids, ndim=2, dtypes=_INT_DTYPES, device=q.device)
        check(position_ids.shape[0] in (1, batch) and position_ids.shape[1] == seqlen, ValueError,
              f"position_ids: expected shape ({batch} or 1, {seqlen}), got {tuple(position_ids.shape)}")
        positions = position_ids.long().expand(batch, seqlen)
    else:
        total = q.shape[0]
        check((position_ids is None) != (cu_seqlens is None), ValueError,
              "position_ids, cu_seqlens: the varlen layout needs exactly one of them (positions restart per "
              f"sequence with cu_seqlens), got {'both' if position_ids is not None else 'neither'}")
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
            check(cu_seqlens.numel() >= 1, ValueError, "cu_seqlens: expected batch + 1 >= 1 entries, got 0")
            if check_v:
                _check_cu_seqlens_values(cu_seqlens, total, None)
            starts = cu_seqlens[:-1].long()
            starts = torch.repeat_interleave(starts, cu_seqlens[1:].long() - starts, output_size=total)
            positions = torch.arange(total, device=q.device) - starts
        else:
            check_tensor("position_ids", position_ids, ndim=1, dtypes=_INT_DTYPES, device=q.device)
            check(position_ids.shape[0] == total, ValueError,
                  f"position_ids: expected shape ({total},) (total_tokens), got {tuple(position_ids.shape)}")
            positions = position_ids.long()
    if check_v and positions.numel():
        lo, hi = positions.min().item(), positions.max().item()
        check(lo >= 0 and hi < max_positions, ValueError,
              f"{'position_ids' if position_ids is not None else 'cu_seqlens'}: expected positions in "
              f"[0, {max_positions - 1}] (the rows of cos / sin), got positions in [{lo}, {hi}]")
    return positions


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, position_ids: Optional[Tensor] = None,
           cu_seqlens: Optional[Tensor] = None, interleaved: bool = False, inplace: bool = False,
           backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 34) applied to q and k.

    Each head's first ``rotary_dim = 2 * cos.shape[1]`` features are rotated pairwise by the angles
    ``theta_i * position`` whose cosines / sines are row ``position`` of ``cos`` / ``sin``; the
    remaining ``head_dim - rotary_dim`` features pass through (partial rotary). Pairs:

    - ``interleaved=False`` (default; GPT-NeoX, ModernBERT, transformers' ``rotate_half``): feature
      ``i`` pairs with ``i + rotary_dim / 2``: ``o1 = x1 cos - x2 sin``, ``o2 = x2 cos + x1 sin``
      with ``x1, x2`` the first and second half.
    - ``interleaved=True`` (the RoPE paper's layout): features ``2i`` and ``2i + 1`` form pair ``i``.

    Computed in fp32 (fp64 for fp64 q), stored in q's dtype. The backward is the inverse
    rotation; ``cos`` and ``sin`` are fixed tables and get no gradient.

    Args:
        q: padded ``(batch, seqlen, num_heads, head_dim)`` or varlen ``(total_tokens, num_heads,
            head_dim)``; fp16, bf16, fp32 or fp64; any strides with a contiguous last dim are
            read in place (others are copied once).
        k: like q (same dtype, device, leading dims and head_dim; num_heads may differ).
        cos, sin: ``(max_positions, rotary_dim / 2)``, any float dtype (read in fp32; fp64 for
            fp64 q), ``rotary_dim <= head_dim``; e.g. ``cos(outer(arange(max_positions),
            base ** (-arange(0, d, 2) / d)))``. Must not require grad.
        position_ids: each token's position. Padded: ``(batch or 1, seqlen)`` integer (default
            ``0 .. seqlen-1`` for every sequence). Varlen: ``(total_tokens,)`` integer, or None with
            ``cu_seqlens``.
        cu_seqlens: varlen only, ``(batch + 1,)`` int32: positions restart at 0 for each sequence.
            Exactly one of ``position_ids`` / ``cu_seqlens`` in the varlen layout.
        interleaved: the pair layout (see above).
        inplace: rotate q and k in their own storage (no new tensors; e.g. views of a fresh fused
            QKV projection output) and return them. Autograd-correct: both are marked modified in
            place (views too: autograd rebases their base's history), so a tensor saved by
            another op before this call raises at backward, as for any in-place op. Needs a
            contiguous last dim, no internally overlapping (expanded) q / k, q and k disjoint,
            and, with grad enabled, neither a leaf that requires grad. Under ``torch.compile``
            the mutation is the custom op ``fastbert::rotary_fwd_``'s declared ``mutates_args``.
        backend: force a backend, else ``FASTBERT_BACKEND``, else automatic.

    Returns:
        ``(q_rotated, k_rotated)``, contiguous, with q's / k's shapes and dtype; with
        ``inplace=True``, ``q`` and ``k`` themselves (their strides kept).

    Raises:
        TypeError: a non-tensor, non-float q/k/cos/sin, dtypes of q and k that differ, non-integer
            position_ids, non-int32 cu_seqlens.
        ValueError: wrong ndim or mismatched shapes (named), ``rotary_dim`` of 0 or above head_dim,
            cu_seqlens with the padded layout, not exactly one of position_ids / cu_seqlens in the
            varlen layout, cos / sin requiring grad; for CPU tensors (or with
            ``FASTBERT_CHECK_INPUTS=1``) also positions outside ``[0, max_positions)`` and
            cu_seqlens values not non-decreasing from 0 to total_tokens (the fast GPU path trusts
            tensor values); with ``inplace=True``, a q / k it cannot write (see ``inplace``).
        RuntimeError: a forced backend cannot take the call.
    """
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=q.dim(), dtypes=(q.dtype,), device=q.device)
    check(k.shape[:-2] == q.shape[:-2] and k.shape[-1] == q.shape[-1], ValueError,
          f"k: expected q's leading dims and head_dim {tuple(q.shape[:-2])}, {q.shape[-1]} (num_heads may "
          f"differ), got shape {tuple(k.shape)} for q {tuple(q.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
        check(not (t.requires_grad and torch.is_grad_enabled()), ValueError,
              f"{name}: the rotary tables get no gradient; pass them detached (got requires_grad=True)")
    check(sin.shape == cos.shape, ValueError, f"sin: expected cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    head_dim, rotary_dim = q.shape[-1], 2 * cos.shape[1]
    check(0 < rotary_dim <= head_dim, ValueError,
          f"cos, sin: expected 1 <= rotary_dim / 2 = cos.shape[1] <= head_dim / 2 = {head_dim / 2}, got {cos.shape[1]}")
    check(isinstance(interleaved, bool), TypeError,
          f"interleaved: expected a bool (Python True or False), got {interleaved!r} of type "
          f"{type(interleaved).__module__}.{type(interleaved).__qualname__}")
    check(isinstance(inplace, bool), TypeError,
          f"inplace: expected a bool (Python True or False), got {inplace!r} of type "
          f"{type(inplace).__module__}.{type(inplace).__qualname__}")
    if inplace:
        _check_inplace(q, k)
    positions = _positions(q, position_ids, cu_seqlens, cos.shape[0])
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = (t.detach().to(cdt).contiguous() for t in (cos, sin))
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    features = {"interleaved"} if interleaved else set()
    if q.dim() == 3:
        features.add("varlen")
    name = resolve(CallInfo("rotary", q.device.type, q.dtype, head_dim, frozenset(features)), backend)
    if not inplace:
        return _rotary_fwd(q, k, cos, sin, positions, interleaved, name)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        rest = (cos, sin, positions, interleaved, name)
        return _RotaryInplaceQ.apply(q, [k], *rest), _RotaryInplaceK.apply(k, *rest)
    _rotary_fwd_inplace(q, k, cos, sin, positions, interleaved, name)
    return q, k
