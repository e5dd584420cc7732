"""Checks of attention's inputs beyond dtype and shape: the local window, ``max_seqlen``, the values
of ``cu_seqlens`` and a padding mask's values (used by :func:`fastbert.ops.attention`, rotary and
the models' entry points)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from fastbert.ops._common import check_tensor, value_checks_enabled


def check_window(window, bound_q: Optional[int] = None, bound_k: Optional[int] = None) -> Optional[tuple[int, int]]:
    """Validate a local-attention ``window`` ``(left, right)``; returns None (global) or a tuple of
    two Python ints, each clamped to the largest value that still differs from a larger one
    (``left`` to ``bound_q``, ``right`` to ``bound_k``, when given as ints): ``i - left <= j`` holds
    for every key once ``left >= seqlen_q - 1``, ``j <= i + right`` once ``right >= seqlen_k - 1``,
    so the clamp changes nothing and keeps kernels' index arithmetic in int32.

    ``window`` is any length-2 sequence: a tuple, a list (what a JSON config such as Hugging
    Face's gives, and what PyTorch's own pair arguments such as ``kernel_size`` take), a
    ``torch.Size``; not a str or bytes, a tensor or an array. An entry is anything with
    ``__index__`` that is not a bool: a Python int, a numpy integer, a 0-d integer tensor (read
    once with ``int()``: a host sync for a CUDA tensor).

    Raises:
        TypeError: not None and not a length-2 sequence, or an entry that is not an integer (the
            error names the entry: ``window[0]`` / ``window[1]``).
        ValueError: a negative entry.
    """
    if window is None:
        return None
    if not (isinstance(window, (tuple, list)) or (  # the common cases first: what torch.compile traces
            isinstance(window, Sequence) and not isinstance(window, (str, bytes, bytearray)))) or len(window) != 2:
        raise TypeError(f"window: expected None or a (left, right) pair of two ints >= 0 (a tuple, list or other "
                        f"length-2 sequence), got {window!r} of type {type(window).__name__}")
    ints = []
    for i, w in enumerate(window):
        if isinstance(w, int) and not isinstance(w, bool):  # the common case, and what torch.compile traces
            ints.append(w)
            continue
        is_bool = isinstance(w, bool) or type(w).__name__ == "bool_" or (
            isinstance(w, Tensor) and w.dtype == torch.bool)
        index = getattr(type(w), "__index__", None)  # operator.index's protocol, without its import
        try:
            if is_bool or index is None or (isinstance(w, Tensor) and w.dim() != 0):
                raise TypeError
            ints.append(int(index(w)))
        except (TypeError, RuntimeError):
            raise TypeError(f"window: expected None or a (left, right) pair of two ints >= 0 (Python or numpy "
                            f"ints, 0-d integer tensors); window[{i}] is {w!r} of type {type(w).__name__}, "
                            f"got {window!r}") from None
    left, right = ints
    if left < 0 or right < 0:
        raise ValueError(f"window: expected (left, right) with left >= 0 and right >= 0, got {window!r}")
    if isinstance(bound_q, int):
        left = min(left, max(bound_q, 0))
    if isinstance(bound_k, int):
        right = min(right, max(bound_k, 0))
    return left, right


def layout_error(exc: ValueError, q, varlen: bool) -> ValueError:
    """``exc`` (q's ndim check failed) with a hint at the layout q's ndim belongs to: a 3-D q is
    the varlen (unpadded) layout, which needs ``cu_seqlens``; a 4-D q is the padded one."""
    if q.dim() == 3 and not varlen:
        hint = ("a 3-D q (total_tokens, num_heads, head_dim) is the varlen (unpadded) layout: pass "
                "cu_seqlens ((batch + 1,) int32) and max_seqlen; the padded layout is 4-D "
                "(batch, seqlen, num_heads, head_dim)")
    elif q.dim() == 4 and varlen:
        hint = ("with cu_seqlens q is the varlen layout (total_tokens, num_heads, head_dim); a padded "
                "4-D q takes attention_mask instead of cu_seqlens")
    else:
        hint = ("q is (batch, seqlen_q, num_heads, head_dim), or with cu_seqlens "
                "(total_tokens, num_heads, head_dim)")
    return ValueError(f"{exc}; {hint}")


def _check_max_seqlen(max_seqlen, total_tokens: int):
    """Metadata check of a given ``max_seqlen``: an int >= 0, an upper bound on the sequence
    lengths (as in FlashAttention's varlen API, so a fixed bound, e.g. the model's
    ``max_position_embeddings``, serves every batch under ``torch.compile``). Returns it clamped to
    ``total_tokens``: no sequence is longer than all tokens together, and a larger bound would only
    size grids and padding for nothing."""
    if not (isinstance(max_seqlen, (int, torch.SymInt)) and not isinstance(max_seqlen, bool)):
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}")
    if not 0 <= max_seqlen:  # message built only on failure: Dynamo cannot format SymInts
        raise ValueError(f"max_seqlen: expected an int >= 0, got {max_seqlen}")
    return total_tokens if max_seqlen > total_tokens else max_seqlen


def _check_cu_seqlens_values(cu_seqlens: Tensor, total_tokens: int, max_seqlen: Optional[int]) -> None:
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if not all(n >= 0 for n in lengths):
        raise ValueError(f"cu_seqlens: expected non-decreasing values, got {cu}")
    if cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == total_tokens == {total_tokens}, got {cu[-1]}")
    if max_seqlen is not None and lengths:
        if not max(lengths) <= max_seqlen:
            raise ValueError(f"max_seqlen: expected >= the longest sequence ({max(lengths)}), got {max_seqlen}")


def padding_mask(attention_mask: Tensor, batch: int, seqlen: int, device=None, *,
                 seqlen_name: str = "seqlen") -> Tensor:
    """Validate a BERT padding mask and return it as bool ``(batch, seqlen)`` (True = attend).

    Accepts bool, integer or floating 0/1 masks. For CPU tensors (or with
    ``FASTBERT_CHECK_INPUTS=1``) the values are checked to be 0 or 1, so an additive mask
    (0 / -10000 / -inf, which belongs in ``attn_bias``) is an error instead of an inverted mask.

    Raises:
        ValueError: wrong ndim or shape, or values other than 0 and 1.
    """
    check_tensor("attention_mask", attention_mask, ndim=2, device=device)
    if attention_mask.shape != (batch, seqlen):  # torch.Size is a tuple: no conversion
        raise ValueError(f"attention_mask: expected shape (batch, {seqlen_name}) = {(batch, seqlen)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if value_checks_enabled(attention_mask) and attention_mask.numel():
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()  # the first offending entry, named exactly
            value = attention_mask[tuple(where)].item()
            raise ValueError(
                "attention_mask: expected 0/1 or bool values (1 = attend, 0 = padding), got "
                f"{value} at {where} ({int(bad.sum())} of {bad.numel()} entries not 0/1; values in "
                f"[{attention_mask.min().item()}, {attention_mask.max().item()}]); an additive "
                "mask (0 / -10000 / -inf) belongs in attn_bias")
    return attention_mask != 0
