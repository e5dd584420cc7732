"""The patch machinery every family shares: run a transformers model's layers through fastbert's
unpadded :class:`fastbert.nn.Encoder`, check the padding mask where the model is entered, and the
instance ``forward`` a patched module gets (:class:`PatchedForward`).

A patched module holds its :class:`fastbert.nn.Encoder` in ``__dict__["_fastbert_encoder"]`` (not
a child: no new state_dict keys, no shared ``train()``), built from blocks that read the
transformers layers' own parameters at every call (:mod:`fastbert.integrations._hf.bert`,
:mod:`fastbert.integrations._hf.modernbert`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fastbert.integrations._hf.attention import collector, packed_sequences, record, register
from fastbert.nn.encoder import Encoder
from fastbert.nn.padding import unpad_metadata
from fastbert.ops import padding_mask


class PatchedForward(functools.partial):
    """A patched module's instance ``forward``: ``PatchedForward(func, module)(*args, **kwargs)``
    calls ``func(module, *args, **kwargs)``, as ``types.MethodType(func, module)`` would.

    A bound method pickles as ``getattr(module, func.__name__)``, an attribute a patched module
    does not have, so ``pickle`` / ``torch.load`` of a patched model failed. This pickles as
    ``(func, module)`` (``func`` by its qualified name), and loading it re-registers fastbert's
    attention with transformers: the model's config names ``attn_implementation="fastbert"``, and
    a fresh process has not called :func:`register`. ``copy.deepcopy``, ``inspect.signature``
    (the forward's own parameters) and ``torch.compile`` see the ``functools.partial`` it is.
    """

    def __reduce__(self):
        return _load_forward, (self.func, self.args[0])


def _load_forward(func: Callable, module: nn.Module) -> PatchedForward:
    register()
    return PatchedForward(func, module)


def run_encoder(owner: nn.Module, hidden_states: Tensor, attention_mask: Optional[Tensor], kwargs: dict, *,
                hf_layers: Sequence[nn.Module], padding_free: bool = True, position_ids: Optional[Tensor] = None,
                final_norm: Optional[Callable[[Tensor], Tensor]] = None,
                block_kwargs: Optional[dict] = None) -> Optional[Tensor]:
    """Run ``owner``'s fastbert :class:`~fastbert.nn.Encoder` on the embeddings.

    The real tokens are packed once, every layer runs on ``(total_tokens, hidden)`` with varlen
    attention, and the result is scattered back once (zeros at padding; transformers computes
    padded rows, compare real tokens); a batch without padding runs as is. Under
    ``torch.compile`` it runs padded (packing has data-dependent shapes). Hidden states and
    attentions go to transformers' output collector, as its hooks would have put them. Gradient
    checkpointing follows the transformers layers' flag (``gradient_checkpointing_enable()``).

    Args:
        owner: the patched module (its ``training`` flag is the encoder's).
        hidden_states: the embeddings ``(batch, seqlen, hidden)``.
        attention_mask: None or the 2-D padding mask ``(batch, seqlen)`` (nonzero = real token).
        kwargs: the forward's other keywords (a padding-free batch's ``cu_seq_lens_q`` /
            ``position_ids``: :func:`~fastbert.integrations._hf.attention.packed_sequences`).
        hf_layers: the transformers layers (their gradient-checkpointing flag is read).
        padding_free: honour a padding-free (packed) batch's sequence boundaries.
        position_ids: ``(batch or 1, seqlen)`` positions for the blocks (ModernBERT's rotary
            embeddings), packed like the tokens; None = the blocks' default.
        final_norm, block_kwargs: as :meth:`fastbert.nn.Encoder.forward`.

    Returns:
        The last hidden state ``(batch, seqlen, hidden)``, or None where this path does not apply
        (a mask that is not 2-D; per-sequence attentions of a packed row): the caller runs
        transformers' own forward.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        return None
    packed_batch = packed_sequences(kwargs, *hidden_states.shape[:2]) if padding_free else None
    collected = collector() or {}
    if packed_batch is not None and "attentions" in collected:
        return None  # per-sequence probabilities of a packed row: the attention function's block mask
    encoder: Encoder = owner.__dict__["_fastbert_encoder"]
    encoder.train(owner.training)
    first = hf_layers[0]
    encoder.gradient_checkpointing = bool(getattr(first, "gradient_checkpointing", False))
    if getattr(first, "_gradient_checkpointing_func", None) is not None:
        encoder._gradient_checkpointing_func = first._gradient_checkpointing_func
    compiling = torch.compiler.is_compiling()
    batch, seqlen = hidden_states.shape[:2]
    packed = {}
    if packed_batch is not None and attention_mask is None:  # padding-free: the sequences' own boundaries
        packed = dict(indices=torch.arange(seqlen, device=hidden_states.device),
                      cu_seqlens=packed_batch[0], max_seqlen=packed_batch[1])
    elif attention_mask is not None and not compiling:
        # the shape first: an all-ones mask of the wrong shape must not pass as "no padding"
        attention_mask = padding_mask(attention_mask, batch, seqlen, hidden_states.device)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: skip the pack / unpack
    block_kwargs = dict(block_kwargs or {})
    if position_ids is not None:
        if attention_mask is not None and not compiling:  # each real token's own position, packed
            indices, cu_seqlens, max_seqlen = unpad_metadata(
                padding_mask(attention_mask, batch, seqlen, hidden_states.device))
            packed = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if packed:
            position_ids = position_ids.expand(batch, seqlen).reshape(-1)[packed["indices"]]
        block_kwargs["position_ids"] = position_ids
    out = encoder(hidden_states, attention_mask, unpad=not compiling,
                  output_attentions="attentions" in collected,
                  output_hidden_states="hidden_states" in collected, final_norm=final_norm,
                  block_kwargs=block_kwargs or None, **packed)
    record(collected, out.hidden_states, out.attentions)
    return out.last_hidden_state


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def check_mask_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (``with_kwargs=True``) of a patched model: a 2-D ``attention_mask`` must be
    a padding mask (1 / True = attend, 0 = padding), checked as :func:`fastbert.ops.padding_mask`
    checks it, before transformers turns a float mask into bool (which would silently invert an
    additive 0 / -10000 / -inf mask). The values are read for CPU tensors (or with
    ``FASTBERT_CHECK_INPUTS=1``) only: on CUDA only ndim and shape are checked, to avoid a host sync;
    nothing is checked here while compiling (the encoder still checks the shape).

    Raises:
        ValueError: a 2-D mask with values other than 0 and 1 (the same error fastbert's own models raise).
    """
    if torch.compiler.is_compiling():  # values are not read while tracing (the encoder checks shapes)
        return None
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        try:
            mask = _signature(type(module)).bind(module, *args, **kwargs).arguments.get("attention_mask")
        except TypeError:  # transformers raises its own error for the call
            return None
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.dtype != torch.bool:
        padding_mask(mask, mask.shape[0], mask.shape[1], mask.device)
    return None

