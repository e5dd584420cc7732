"""Unpad / pad helpers (the packed, varlen layout): pack the real tokens of a padded batch and scatter them back.

The unpadded encoder (after flash-attention's ``bert_padding``) calls :func:`unpad_input` once per
forward, runs every layer on the packed tokens ``(total_tokens, hidden)`` with varlen attention
(``cu_seqlens``, ``max_seqlen``), and calls :func:`pad_input` once at the end.

Mask convention (BERT's and Hugging Face's): ``attention_mask`` is ``(batch, seqlen)``, nonzero /
True = a real token, 0 = padding. Real tokens need not be a prefix (left padding works): they are
packed in row-major order, so sequence ``b`` occupies rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of
the packed tensor, in their original order.

:func:`unpad_metadata` reads the mask's values (``nonzero`` and ``max``): one host sync, and
data-dependent shapes, so it runs outside ``torch.compile`` regions; compiled callers compute it
once outside and pass ``indices`` / ``cu_seqlens`` / ``max_seqlen`` to the model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unpad_metadata(attention_mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Packing metadata from a padding mask.

    Args:
        attention_mask: ``(batch, seqlen)``, bool or integer; nonzero = real token.

    Returns:
        indices: ``(total_tokens,)`` int64, flat positions ``b * seqlen + s`` of the real tokens.
        cu_seqlens: ``(batch + 1,)`` int32, cumulative sequence lengths starting at 0.
        max_seqlen: Python int, the longest sequence (0 for an empty batch). One host sync.

    Raises:
        ValueError: attention_mask is not 2-D.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected 2 dims (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    real = attention_mask != 0
    seqlens = real.sum(dim=-1, dtype=torch.int32)  # [batch]
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()  # [total_tokens] int64
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, max_seqlen


def unpad_input(hidden_states: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Pack the real tokens of a padded batch.

    Args:
        hidden_states: ``(batch, seqlen, ...)``, any dtype.
        attention_mask: ``(batch, seqlen)``; nonzero = real token, 0 = padding.

    Returns:
        hidden_unpadded: ``(total_tokens, ...)``, the real tokens in row-major order (differentiable).
        indices: ``(total_tokens,)`` int64 flat positions into ``(batch * seqlen)``.
        cu_seqlens: ``(batch + 1,)`` int32.
        max_seqlen: Python int.

    Raises:
        ValueError: the shapes of hidden_states and attention_mask disagree.
    """
    if hidden_states.dim() < 2 or tuple(hidden_states.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"hidden_states: expected shape (batch, seqlen, ...) matching attention_mask "
                         f"{tuple(attention_mask.shape)}, got {tuple(hidden_states.shape)}")
    indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)
    return index_first_axis(hidden_states, indices), indices, cu_seqlens, max_seqlen


def index_first_axis(hidden_states: Tensor, indices: Tensor) -> Tensor:
    """``hidden_states.flatten(0, 1)[indices]``: ``(batch, seqlen, ...)`` -> ``(total_tokens, ...)``."""
    return hidden_states.flatten(0, 1).index_select(0, indices)


def pad_input(hidden_unpadded: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Scatter packed tokens back to a padded batch, writing zeros at padding positions.

    Args:
        hidden_unpadded: ``(total_tokens, ...)``.
        indices: ``(total_tokens,)`` int64 from :func:`unpad_input` / :func:`unpad_metadata`.
        batch, seqlen: the padded shape.

    Returns:
        ``(batch, seqlen, ...)`` with hidden_unpadded's dtype; differentiable in hidden_unpadded.
    """
    rest = tuple(hidden_unpadded.shape[1:])
    out = hidden_unpadded.new_zeros((batch * seqlen,) + rest)
    out = out.index_put((indices,), hidden_unpadded)  # out of place: autograd-friendly
    return out.view((batch, seqlen) + rest)


__all__ = ["unpad_metadata", "unpad_input", "pad_input", "index_first_axis"]
