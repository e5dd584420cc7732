"""THE unpadded encoder: pack once, run every layer on ``(total_tokens, hidden)``, unpack once.

One implementation serves every BERT-family model (:mod:`fastbert.models`) and ``patch()``
(after flash-attention's ``models/bert.py``). A family plugs in small adapters:

- :class:`Embeddings`: word + position (+ token type) -> LayerNorm -> dropout, with the
  switches the families differ by (token types or none, RoBERTa's positions starting at
  ``padding_idx + 1``, ELECTRA's ``embedding_size``);
- a block with the protocol below: the post-norm BERT block (:class:`fastbert.nn.BertLayer`),
  DistilBERT's (:class:`fastbert.nn.bert.DistilBertBlock`), or the pre-norm variant
  (:class:`PreNormLayer`, ModernBERT's layout, with ``final_norm`` passed to the encoder).

Block protocol: ``block(hidden, attention_mask=None, *, cu_seqlens=None, max_seqlen=None,
output_attentions=False, probs_mask=None, indices=None) -> (hidden, probs or None)`` on padded
``(batch, seqlen, hidden)`` with a bool mask, or packed ``(total_tokens, hidden)`` with
``cu_seqlens`` / ``max_seqlen``.

Gradient checkpointing is a flag (``Encoder.gradient_checkpointing``) that models set;
transformers' ``gradient_checkpointing_enable()`` sets it (and ``_gradient_checkpointing_func``)
on any submodule with that attribute. This module imports torch and fastbert.ops only.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastbert.nn.modules import LayerNorm, OpsModule
from fastbert.nn.padding import index_first_axis, pad_input, unpad_metadata
from fastbert.ops import layer_norm, padding_mask, value_checks_enabled


class EncoderOutput(NamedTuple):
    """What :class:`Encoder` returns.

    last_hidden_state: ``(batch, seqlen, hidden)``; zeros at padding when run packed.
    packed: ``(total_tokens, hidden)``, the last layer's real tokens when run packed, else None
        (heads that score every token run on these only).
    indices: ``(total_tokens,)`` int64 flat positions of ``packed`` (None when padded).
    hidden_states: embeddings + every layer's output, each ``(batch, seqlen, hidden)``, or None.
    attentions: per layer ``(batch, num_heads, seqlen, seqlen)`` (before dropout), or None.
    """

    last_hidden_state: Tensor
    packed: Optional[Tensor]
    indices: Optional[Tensor]
    hidden_states: Optional[tuple]
    attentions: Optional[tuple]


def check_ids(name: str, ids: Optional[Tensor], table: nn.Embedding) -> None:
    """Token / type / position ids that index ``table``: int64 or int32 (what ``nn.Embedding``
    takes), values in ``[0, num_embeddings)`` (read for CPU tensors or with FASTBERT_CHECK_INPUTS=1).

    Raises:
        TypeError: another dtype (named, with the dtype). ValueError: values out of range.
    """
    if ids is None:
        return
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected dtype torch.int64 or torch.int32, got {ids.dtype}")
    if ids.numel() and value_checks_enabled(ids):
        lo, hi = ids.min().item(), ids.max().item()
        if lo < 0 or hi >= table.num_embeddings:
            raise ValueError(f"{name}: expected values in [0, {table.num_embeddings - 1}], "
                             f"got values in [{lo}, {hi}]")


def embeds_as_table(inputs_embeds: Tensor, table: nn.Embedding) -> Tensor:
    """``inputs_embeds`` in the word embeddings' dtype: transformers adds them to the (table-dtype)
    position / type embeddings, so fp16 / bf16 embeds into an fp32 model run in fp32 there too;
    the fused add & norm takes one dtype, so cast (differentiable) instead of failing in a GEMM.

    Raises:
        TypeError: a dtype that is not floating point (named, with the dtype).
    """
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds: expected a floating-point dtype, got {inputs_embeds.dtype}")
    return inputs_embeds.to(table.weight.dtype)


class Embeddings(OpsModule, nn.Module):
    """``dropout(LayerNorm(word + position [+ token_type]))``; the sum is fused into the LayerNorm.

    Args:
        vocab_size, hidden_size (the embedding width: ELECTRA's ``embedding_size``),
        max_position_embeddings, layer_norm_eps, dropout_p: as the config.
        type_vocab_size: rows of ``token_type_embeddings``; 0 = no token types (DistilBERT).
        pad_token_id: ``padding_idx`` of the word embeddings.
        position_padding_idx: None = positions ``0..seqlen-1`` (BERT); an int = RoBERTa's
            positions ``padding_idx + 1 + i`` over real tokens (``padding_idx`` at pad tokens), the
            position table gets that ``padding_idx``.

    forward(input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) ->
    ``(batch, seqlen, hidden)``; ids ``(batch, seqlen)`` int64, inputs_embeds ``(batch, seqlen,
    hidden)``. ``position_ids`` / ``token_type_ids`` are non-persistent buffers (as transformers'):
    models built on the meta device set them in ``_init_weights`` (:meth:`reset_buffers`).

    Raises:
        TypeError: ids that are not int64 / int32, an inputs_embeds dtype that is not floating point
            (another floating dtype is cast to the table's, :func:`embeds_as_table`).
        ValueError: ids out of their table's range (CPU tensors, or FASTBERT_CHECK_INPUTS=1),
            seqlen beyond the position table, token_type_ids given without token types, a
            token_type_ids / position_ids shape other than ``(batch or 1, seqlen)`` (or
            ``(seqlen,)``), an inputs_embeds width other than ``hidden_size``.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, *,
                 type_vocab_size: int, pad_token_id: Optional[int], layer_norm_eps: float, dropout_p: float,
                 position_padding_idx: Optional[int] = None):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size, padding_idx=position_padding_idx)
        if type_vocab_size:
            self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout_p = dropout_p
        self.position_padding_idx = position_padding_idx
        self.register_buffer("position_ids", torch.arange(max_position_embeddings)[None], persistent=False)
        if type_vocab_size:
            self.register_buffer("token_type_ids", torch.zeros(1, max_position_embeddings, dtype=torch.long),
                                 persistent=False)

    def reset_buffers(self) -> None:
        """Fill the non-persistent buffers (a model built on the meta device has garbage there)."""
        with torch.no_grad():
            self.position_ids.copy_(torch.arange(self.position_ids.shape[-1])[None])
            if hasattr(self, "token_type_ids"):
                self.token_type_ids.zero_()

    def positions(self, input_ids: Optional[Tensor], seqlen: int) -> Tensor:
        """Default position ids ``(1 or batch, seqlen)``."""
        if self.position_padding_idx is None:
            return self.position_ids[:, :seqlen]
        pad = self.position_padding_idx
        if input_ids is None:  # inputs_embeds: every token is real
            return self.position_ids[:, :seqlen] + pad + 1
        real = (input_ids != pad).long()
        return torch.cumsum(real, dim=1) * real + pad  # real tokens count from pad + 1

    def forward(self, input_ids: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        batch, seqlen = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        table = self.position_embeddings.num_embeddings
        offset = 0 if self.position_padding_idx is None else self.position_padding_idx + 1
        if position_ids is None and seqlen + offset > table:
            raise ValueError(f"input_ids: expected seqlen <= max_position_embeddings ({table})"
                             f"{f' - {offset}' if offset else ''}, got {seqlen}")
        has_types = hasattr(self, "token_type_embeddings")
        if token_type_ids is not None and not has_types:
            raise ValueError("token_type_ids: this model has no token type embeddings (type_vocab_size 0 or "
                             "DistilBERT); pass None")
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.word_embeddings.embedding_dim:
            raise ValueError(f"inputs_embeds: expected (batch, seqlen, {self.word_embeddings.embedding_dim}), got "
                             f"shape {tuple(inputs_embeds.shape)}")
        for name, ids, emb in (("input_ids", input_ids, self.word_embeddings),
                               ("token_type_ids", token_type_ids, getattr(self, "token_type_embeddings", None)),
                               ("position_ids", position_ids, self.position_embeddings)):
            if ids is not None and name != "input_ids" and not (
                    ids.dim() in (1, 2) and ids.shape[-1] == seqlen and (ids.dim() == 1 or ids.shape[0] in (1, batch))):
                raise ValueError(f"{name}: expected shape (batch or 1, seqlen) = ({batch} or 1, {seqlen}), got "
                                 f"{tuple(ids.shape)}")
            check_ids(name, ids, emb)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        else:
            inputs_embeds = embeds_as_table(inputs_embeds, self.word_embeddings)
        if position_ids is None:
            position_ids = self.positions(input_ids, seqlen)
        rest = self.position_embeddings(position_ids)
        if has_types:
            if token_type_ids is None:
                token_type_ids = self.token_type_ids[:, :seqlen]
            rest = rest + self.token_type_embeddings(token_type_ids)
        x = layer_norm(inputs_embeds, self.LayerNorm.weight, self.LayerNorm.bias, eps=self.LayerNorm.eps,
                       residual=rest.expand_as(inputs_embeds).to(inputs_embeds.dtype), backend=self.backend)
        return F.dropout(x, self.dropout_p, self.training)  # after LayerNorm, as in BERT


class Encoder(nn.Module):
    """A stack of blocks (``layer.N`` keys) run unpadded or padded.

    Args:
        layers: the blocks (see the module docstring for their protocol).

    Attributes:
        gradient_checkpointing: recompute each block in backward while training (default False).
    """

    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.gradient_checkpointing = False

    def forward(self, embeddings: Tensor, attention_mask: Optional[Tensor] = None, *, unpad: bool = True,
                indices: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, output_attentions: bool = False,
                output_hidden_states: bool = False,
                final_norm: Optional[Callable[[Tensor], Tensor]] = None, layers: Optional[Sequence[nn.Module]] = None,
                block_kwargs: Optional[dict] = None) -> EncoderOutput:
        """Run the stack.

        Args:
            embeddings: ``(batch, seqlen, hidden)``.
            attention_mask: ``(batch, seqlen)``, nonzero = real token; None = all real.
            unpad: pack the real tokens (one host sync for the metadata) or run padded.
            indices, cu_seqlens, max_seqlen: precomputed ``unpad_metadata(attention_mask)``
                (``(total_tokens,)`` int64, ``(batch + 1,)`` int32, int) so a compiled caller avoids
                the host sync; they imply the packed mode and take precedence over the mask.
            output_attentions, output_hidden_states: collect them (see :class:`EncoderOutput`).
            final_norm: applied after the last block (pre-norm stacks such as ModernBERT's).
            layers: run these blocks instead of ``self.layer`` (a model that keeps its blocks under
                another name, ModernBERT's ``layers``, runs them through an Encoder of no layers).
            block_kwargs: extra keywords passed to every block (ModernBERT's rotary tables, positions).

        Raises:
            ValueError: a wrongly shaped or valued attention_mask; only one of indices / cu_seqlens.
            RuntimeError: the packed mode without precomputed metadata inside torch.compile.
        """
        if (indices is None) != (cu_seqlens is None):
            raise ValueError("indices, cu_seqlens: expected both (from unpad_metadata) or neither")
        batch, seqlen = embeddings.shape[:2]
        if attention_mask is not None:  # bool, values checked (an additive mask is an error)
            attention_mask = padding_mask(attention_mask, batch, seqlen, embeddings.device)
        varlen = cu_seqlens is not None or (unpad and attention_mask is not None)
        kw: dict = dict(block_kwargs or {}, output_attentions=bool(output_attentions))
        layers = self.layer if layers is None else layers
        if varlen:
            if cu_seqlens is None:
                if torch.compiler.is_compiling():
                    raise RuntimeError(
                        "the unpadded encoder packs tokens with data-dependent shapes, which torch.compile "
                        "cannot trace; pass indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask) "
                        "computed outside the compiled region, or run padded (unpad=False)")
                indices, cu_seqlens, max_seqlen = unpad_metadata(attention_mask)
            kw.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if output_attentions:
                probs_mask = attention_mask
                if probs_mask is None:
                    probs_mask = pad_input(torch.ones_like(indices, dtype=torch.bool), indices, batch, seqlen)
                kw.update(probs_mask=probs_mask, indices=indices)
            hidden, mask = index_first_axis(embeddings, indices), None  # [total_tokens, hidden]
        else:
            hidden, mask = embeddings, attention_mask  # [batch, seqlen, hidden]
        to_padded = (lambda h: pad_input(h, indices, batch, seqlen)) if varlen else (lambda h: h)
        all_hidden = (to_padded(hidden),) if output_hidden_states else None
        all_probs = () if output_attentions else None
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(layers):
            if checkpointed:
                func = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                    checkpoint, use_reentrant=False)
                hidden, probs = func(functools.partial(layer, **kw), hidden, mask)
            else:
                hidden, probs = layer(hidden, mask, **kw)
            if final_norm is not None and i == len(layers) - 1:
                hidden = final_norm(hidden)
            if output_hidden_states:
                all_hidden += (to_padded(hidden),)
            if output_attentions:
                all_probs += (probs,)
        last = all_hidden[-1] if output_hidden_states else to_padded(hidden)
        return EncoderOutput(last, hidden if varlen else None, indices if varlen else None, all_hidden, all_probs)


class PreNormLayer(nn.Module):
    """A pre-norm block (ModernBERT's layout): ``h + attn(attn_norm(h))``, then ``+ mlp(mlp_norm(h))``.

    ``attn`` follows the block protocol's signature and returns ``(out, probs)``; ``mlp`` maps
    ``(..., hidden) -> (..., hidden)``; either norm may be ``nn.Identity()`` (ModernBERT's first
    layer has no attention norm). The stack's last norm goes to ``Encoder(final_norm=...)``.
    """

    def __init__(self, attn_norm: nn.Module, attn: nn.Module, mlp_norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kw):
        out, probs = self.attn(self.attn_norm(hidden_states), attention_mask, **kw)
        hidden_states = hidden_states + out
        return hidden_states + self.mlp(self.mlp_norm(hidden_states)), probs


__all__ = ["Encoder", "EncoderOutput", "Embeddings", "PreNormLayer"]
