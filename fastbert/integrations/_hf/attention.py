"""transformers' attention and mask interfaces for ``attn_implementation="fastbert"``.

Self- and cross-attention: transformers calls ``attention_interface(module, query, key, value,
attention_mask, dropout=, scaling=, **kwargs)`` with q/k/v ``(batch, num_heads, seqlen, head_dim)``;
:func:`fastbert_attention_forward` hands strided ``(batch, seqlen, num_heads, head_dim)`` views of
them (no copies) to :func:`fastbert.ops.attention`. Masks: transformers builds the mask with the
function registered under the same name in its ``AttentionMaskInterface``; :func:`fastbert_mask`
hands over the 2-D padding mask ``(batch, seqlen_k)`` (True = attend) for bidirectional attention;
any other pattern becomes a 4-D boolean mask applied as an additive ``-inf`` bias. Also the output
collector helpers that the patched encoders share (:func:`collector`, :func:`record`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastbert.ops import attention

ATTN_IMPLEMENTATION = "fastbert"

def _hf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("fastbert.integrations.transformers needs transformers>=5,<6: "
                          "pip install 'fastbert[demo]'") from e
    major = int(transformers.__version__.split(".")[0])
    if not 5 <= major < 6:
        raise ImportError(f"fastbert.integrations.transformers: expected transformers>=5,<6, "
                          f"got {transformers.__version__}")
    return transformers


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def _split_mask(attention_mask: Optional[Tensor], dtype: torch.dtype
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """transformers' mask -> (2-D padding mask, additive bias); at most one is not None.

    2-D ``(batch, seqlen_k)`` (from :func:`fastbert_mask`): True / nonzero = attend.
    4-D boolean ``(batch, 1 | num_heads, seqlen_q, seqlen_k)``: True = attend -> 0 / ``-inf``.
    4-D float: already additive (transformers' eager convention), used as is.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        return attention_mask, None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: expected 2 or 4 dims, got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return None, bias.masked_fill(~attention_mask, float("-inf"))
    return None, attention_mask.to(dtype)


def attention_probs_forward(query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Optional[Tensor], attn_bias: Optional[Tensor],
                            dropout_p: float, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Attention in plain torch ops that also returns the probabilities (``output_attentions``).

    The same math and masking rules as :func:`fastbert.ops.attention` (Vaswani et al. 2017,
    eq. 1): a row with no key to attend returns zeros and zero probabilities, never NaN.
    Dropout uses torch's RNG (not fastbert's Philox scheme), as transformers' eager path does.

    Args:
        query, key, value: ``(batch, num_heads, seqlen, head_dim)`` (transformers' layout).
        attention_mask: None or ``(batch, seqlen_k)``, True / nonzero = attend.
        attn_bias: None or additive, broadcastable to ``(batch, num_heads, seqlen_q, seqlen_k)``.

    Returns:
        ``out`` ``(batch, seqlen_q, num_heads, head_dim)`` and ``probs`` ``(batch, num_heads,
        seqlen_q, seqlen_k)``, both in query's dtype (scores and softmax in fp32).
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * softmax_scale
    if attn_bias is not None:
        scores = scores + attn_bias.float()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    # Zero-fill empty rows before the softmax and zero them after: no NaN, not even in gradients.
    has_key = (scores > float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    probs = probs.to(query.dtype)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0.0 else probs
    out = torch.matmul(dropped, value).transpose(1, 2)
    return out, probs


def packed_sequences(kwargs: dict, batch: int, seqlen: int) -> Optional[tuple[Tensor, int]]:
    """The sequence boundaries of a padding-free (packed) batch, as varlen attention takes them.

    transformers' ``DataCollatorWithFlattening`` concatenates the sequences of a batch into one
    row ``(1, total_tokens)`` and marks the boundaries either with ``cu_seq_lens_q`` ``(n + 1,)``
    and ``max_length_q`` (``return_flash_attn_kwargs=True``) or only with ``position_ids`` that
    restart for every sequence (at ``position_ids_start``, e.g. 2 for RoBERTa): a sequence starts
    wherever a position is not its predecessor + 1 (transformers' own rule).

    Args:
        kwargs: the forward's keyword arguments (``cu_seq_lens_q``, ``max_length_q``, ``position_ids``).
        batch, seqlen: the batch's padded shape.

    Returns:
        ``(cu_seqlens (n + 1,) int32, max_seqlen int)``, or None for an ordinary batch (no
        ``cu_seq_lens_q`` and batch > 1, or positions without a restart). Reading
        ``position_ids`` costs one host sync; under ``torch.compile`` only ``cu_seq_lens_q`` counts.

    Raises:
        ValueError: ``cu_seq_lens_q`` with batch != 1.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: a padding-free batch has batch size 1, got {batch}")
        max_len = kwargs.get("max_length_q")
        max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
        return cu.to(torch.int32), max_len
    pos = kwargs.get("position_ids")
    if pos is None or batch != 1 or pos.numel() != seqlen or seqlen < 2 or torch.compiler.is_compiling():
        return None
    pos = pos.reshape(-1)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    cu = F.pad(starts, (1, 1)).to(torch.int32)
    cu[-1] = seqlen
    return cu, int((cu[1:] - cu[:-1]).max())


def fastbert_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' ``AttentionInterface`` function for ``attn_implementation="fastbert"``.

    Args:
        module: the calling attention module (its ``_fastbert_backend`` attribute, set by
            :func:`patch`, forces a fastbert backend).
        query, key, value: ``(batch, num_heads, seqlen, head_dim)``, as transformers passes them;
            read in place through ``.transpose(1, 2)`` views.
        attention_mask: what :func:`fastbert_mask` built: None, the 2-D padding mask
            ``(batch, seqlen_k)`` (True = attend), or a 4-D mask (boolean, or transformers'
            additive float mask).
        dropout: attention-probability dropout (transformers passes 0 in eval mode).
        scaling: softmax scale, ``1 / sqrt(head_dim)`` when None.
        kwargs: ``output_attentions=True`` selects the plain torch path that returns the
            probabilities; other keys (position_ids, ...) are ignored.

    Returns:
        ``(out, probs)``: out ``(batch, seqlen_q, num_heads, head_dim)`` in query's dtype (the
        layout transformers reshapes to ``(batch, seqlen_q, hidden)``); probs ``(batch,
        num_heads, seqlen_q, seqlen_k)`` with ``output_attentions=True``, else None.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: not supported by attn_implementation='fastbert'")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding_window: not supported by attn_implementation='fastbert'")
    if getattr(module, "num_key_value_groups", 1) != 1:
        raise ValueError(f"num_key_value_groups: attn_implementation='fastbert' supports 1 (BERT's "
                         f"multi-head attention), got {module.num_key_value_groups}")
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
    if is_causal and attention_mask is None and query.shape[2] > 1:
        # fastbert_mask always materialises causal masks; a causal call without one would
        # silently attend to the future.
        raise ValueError("attention_mask: a causal attention call needs a mask with "
                         "attn_implementation='fastbert' (fastbert.ops.attention has no is_causal)")
    softmax_scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask2d, bias = _split_mask(attention_mask, query.dtype)
    probs_wanted = kwargs.get("output_attentions", False) or "attentions" in (collector() or {})
    packed = packed_sequences(kwargs, query.shape[0], query.shape[2]) if key.shape[2] == query.shape[2] else None
    if packed is not None and mask2d is None and bias is None:
        cu_seqlens, max_seqlen = packed
        if probs_wanted:  # the probabilities are dense anyway: a block-diagonal mask over the row
            seq = torch.searchsorted(cu_seqlens[1:], torch.arange(query.shape[2], device=query.device), right=True)
            block = torch.zeros(seq.shape * 2, dtype=query.dtype, device=query.device)
            block = block.masked_fill(seq[:, None] != seq[None, :], float("-inf"))
            return attention_probs_forward(query, key, value, None, block, dropout, softmax_scale)
        # (1, H, total, d) -> (total, H, d) views: varlen attention on the sequences' own boundaries
        out = attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout,
                        softmax_scale=softmax_scale, backend=getattr(module, "_fastbert_backend", None))
        return out[None], None
    if probs_wanted:
        return attention_probs_forward(query, key, value, mask2d, bias, dropout, softmax_scale)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                    attention_mask=mask2d, attn_bias=bias, dropout_p=dropout,
                    softmax_scale=softmax_scale, backend=getattr(module, "_fastbert_backend", None))
    return out, None


def fastbert_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None, attention_mask: Optional[Tensor] = None,
                  **kwargs) -> Optional[Tensor]:
    """transformers' ``AttentionMaskInterface`` function for ``attn_implementation="fastbert"``.

    Bidirectional attention (BERT's encoder and cross-attention): returns the 2-D padding mask
    ``(batch, kv_length)`` as given (bool, True = attend; the last ``kv_length`` columns), or
    None without one. Unlike transformers' flash-attention mask function it never drops an
    all-True mask, since that check would read tensor values (a host sync, a graph break).
    Any other ``mask_function`` (causal, packed sequences, overlays): the 4-D boolean mask of
    transformers' ``sdpa_mask`` ``(batch, 1, q_length, kv_length)``.
    """
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if mask_function is None or mask_function is bidirectional_mask_function:
        return None if attention_mask is None else attention_mask[:, -kv_length:]
    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(name, None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     **kwargs)


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register fastbert's attention and mask functions with transformers under ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` work for every model built on transformers'
    ``AttentionInterface`` (BERT and its family). Registers both the attention function and the
    mask function (without the latter transformers silently passes no padding mask).
    Idempotent. Returns ``name``.
    """
    _hf()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastbert_attention_forward)
    AttentionMaskInterface.register(name, fastbert_mask)
    return name


def collector() -> Optional[dict]:
    """The outputs transformers' ``capture_outputs`` is collecting for this forward (``{"attentions":
    [...], "hidden_states": [...], ...}``, from the call's ``output_*`` or the config), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers 5 releases
        return None
    return _active_collector.get()


def record(collected: dict, hidden_states, attentions) -> None:
    """Hand the encoder's outputs to transformers' collector, as its forward hooks would have."""
    if hidden_states is not None and "hidden_states" in collected:
        out, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
        for h in hidden_states:
            out.append(h if selection is None or len(out) in selection else None)
    if attentions is not None and "attentions" in collected:
        collected["attentions"].extend(attentions)

