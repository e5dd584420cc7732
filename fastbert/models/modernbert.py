"""ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer") on fastbert ops, unpadded
throughout: transformers' ``ModernBertConfig``, outputs and checkpoint keys (``model.embeddings.*``,
``model.layers.N.{attn_norm, attn.Wqkv, attn.Wo, mlp_norm, mlp.Wi, mlp.Wo}``, ``model.final_norm``,
``head.{dense, norm}``, ``decoder``, ``classifier``), so transformers' checkpoints load as they are.

The blocks are :mod:`fastbert.nn.modernbert`'s, run by :class:`fastbert.nn.Encoder` on the packed
real tokens (the pre-norm stack with ``final_norm``). Positions: transformers numbers the padded
columns ``0..seqlen-1``; unpadded, positions restart at 0 per sequence. Rotary attention depends
on position differences only, so the two agree up to rounding even with left padding
(``position_ids``, when given, are used as they are in both modes).

fastbert-only keywords as :mod:`fastbert.models._base` (``unpad``, ``backend``); the masked-LM
head's ``sparse_prediction`` defaults to the config's. Unpadded, sequence classification with
``classifier_pooling="cls"`` reads position 0: with left padding that row is zeros (transformers
reads the padding row's hidden state there).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import ModernBertConfig
from transformers import initialization as init

from fastbert.models._base import (FastbertPreTrainedModel, base_output, check_input_ids, check_packing_metadata,
                                   embeds_without_padding)
from fastbert.models.heads import task_output, token_logits
from fastbert.nn import Encoder, LayerNorm
from fastbert.nn.modernbert import (ModernBertAttention, ModernBertEmbeddings, ModernBertMLP,
                                    ModernBertPredictionHead, RotaryTables, modernbert_layer)
from fastbert.nn.padding import unpad_metadata
from fastbert.ops import padding_mask


class ModernBertPreTrainedModel(FastbertPreTrainedModel):
    """Base of the ModernBERT classes: ``ModernBertConfig``, weights under ``model.``. Init as
    transformers': truncated normals (cutoff ``initializer_cutoff_factor`` std) with std
    ``initializer_range`` for inputs, ``/ sqrt(2 * num_hidden_layers)`` for outputs,
    ``hidden_size ** -0.5`` for classifiers; zero biases."""

    config_class = ModernBertConfig
    base_model_prefix = "model"
    _no_split_modules = ["ModernBertEmbeddings", "PreNormLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        cfg = self.config
        cutoff = cfg.initializer_cutoff_factor or 3.0
        std_in, std_out = cfg.initializer_range, cfg.initializer_range / (2.0 * cfg.num_hidden_layers) ** 0.5

        def trunc(lin, std):
            init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-cutoff * std, b=cutoff * std)
            if getattr(lin, "bias", None) is not None:
                init.zeros_(lin.bias)

        if isinstance(module, ModernBertEmbeddings):
            trunc(module.tok_embeddings, std_in)
        elif isinstance(module, (ModernBertMLP,)):
            trunc(module.Wi, std_in)
            trunc(module.Wo, std_out)
        elif isinstance(module, ModernBertAttention):
            trunc(module.Wqkv, std_in)
            trunc(module.Wo, std_out)
        elif isinstance(module, ModernBertPredictionHead):
            trunc(module.dense, std_out)
        elif isinstance(module, ModernBertForMaskedLM):
            trunc(module.decoder, std_out)
        elif isinstance(module, (ModernBertForSequenceClassification, ModernBertForTokenClassification)):
            trunc(module.classifier, cfg.hidden_size ** -0.5)
        elif isinstance(module, RotaryTables):  # non-persistent buffers: garbage on the meta device
            for t, (cos, sin) in module.fresh().items():
                init.copy_(getattr(module, f"{t}_cos"), cos)
                init.copy_(getattr(module, f"{t}_sin"), sin)


class ModernBertModel(ModernBertPreTrainedModel):
    """Embeddings (+ norm) -> N pre-norm layers (global / sliding-window attention with rotary
    embeddings, GeGLU MLP) -> ``final_norm``.

    Args:
        config: ``transformers.ModernBertConfig``.
        unpad, backend: see :mod:`fastbert.models._base`.
    """

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(modernbert_layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.rotary_emb = RotaryTables(config)
        self.encoder = Encoder([])  # runs self.layers (no parameters of its own: no state_dict keys)
        self._unpad = unpad
        self._fastbert_init(backend)

    def get_input_embeddings(self):
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.tok_embeddings = value

    def encode(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
               output_attentions=None, output_hidden_states=None, *, indices=None, cu_seqlens=None,
               max_seqlen=None):
        """Run the model; returns :class:`fastbert.nn.EncoderOutput` (heads read its ``packed``)."""
        check_input_ids(input_ids, inputs_embeds)
        batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        check_packing_metadata(attention_mask, indices, cu_seqlens, batch, seqlen)
        inputs_embeds = embeds_without_padding(inputs_embeds, attention_mask, self._unpad or cu_seqlens is not None,
                                               indices)
        x = self.embeddings(input_ids, inputs_embeds)  # [batch, seqlen, hidden]
        packed = cu_seqlens is not None or (self._unpad and attention_mask is not None)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seqlen:
                raise ValueError(f"position_ids: expected shape ({batch} or 1, {seqlen}), got "
                                 f"{tuple(position_ids.shape)}")
            if packed:  # each real token's own position, packed like the tokens
                if cu_seqlens is None:
                    indices, cu_seqlens, max_seqlen = unpad_metadata(
                        padding_mask(attention_mask, batch, seqlen, x.device))
                position_ids = position_ids.expand(batch, seqlen).reshape(-1)[indices]
        cfg = self.config
        return self.encoder(
            x, attention_mask, unpad=self._unpad, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            output_attentions=bool(cfg.output_attentions if output_attentions is None else output_attentions),
            output_hidden_states=bool(cfg.output_hidden_states if output_hidden_states is None
                                      else output_hidden_states),
            final_norm=self.final_norm, layers=self.layers,
            block_kwargs=dict(rotary=self.rotary_emb.tables(seqlen), position_ids=position_ids))

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, *, indices: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
        """Encode a padded batch (transformers' argument order).

        Args:
            input_ids: ``(batch, seqlen)`` integer token ids; or ``inputs_embeds`` ``(batch, seqlen,
                hidden)`` (exactly one).
            attention_mask: ``(batch, seqlen)``, 1 / True = real token, 0 = padding; None = all real.
            position_ids: ``(batch or 1, seqlen)`` rotary positions (default: see the module docstring).
            output_attentions: per-layer attention probabilities (a plain-torch pass, windowed on
                local layers). output_hidden_states: embeddings + every layer's output (the last
                one after ``final_norm``).
            indices, cu_seqlens, max_seqlen: precomputed ``unpad_metadata(attention_mask)``.

        Returns:
            ``BaseModelOutput``: last_hidden_state ``(batch, seqlen, hidden)`` (zeros at padding when
            unpadded), hidden_states, attentions.

        Raises:
            ValueError / TypeError: as :meth:`fastbert.models.BertModel.forward`; a wrongly shaped
            position_ids.
        """
        enc = self.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                          output_hidden_states, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return base_output(self.config, enc, return_dict)


class _ModernBertHead(ModernBertPreTrainedModel):
    def _build(self, config, unpad: bool) -> None:
        self.num_labels = config.num_labels
        self.model = ModernBertModel(config, unpad=unpad)
        self.head = ModernBertPredictionHead(config)

    def _build_classifier(self, config, unpad: bool, backend: Optional[str]) -> None:
        """The encoder plus the classification heads' ``drop`` and ``classifier`` (transformers'
        names), then fastbert's initialisation."""
        self._build(config, unpad)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._fastbert_init(backend)

    def _encode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                output_hidden_states, indices, cu_seqlens, max_seqlen):
        return self.model.encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                                 output_hidden_states, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


class ModernBertForMaskedLM(_ModernBertHead):
    """``decoder(head(h))`` per token; the decoder weight is tied to ``tok_embeddings``.
    ``sparse_prediction`` (default: the config's): with labels, logits only where
    ``labels != -100``, ``(num_labelled, vocab_size)`` (as transformers' sparse mode)."""

    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: Optional[bool] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.sparse_prediction = config.sparse_prediction if sparse_prediction is None else sparse_prediction
        if self.sparse_prediction and config.sparse_pred_ignore_index != -100:
            raise NotImplementedError(f"sparse_pred_ignore_index: fastbert ignores -100, got "
                                      f"{config.sparse_pred_ignore_index}")
        self._fastbert_init(backend)

    def get_output_embeddings(self):
        return self.decoder

    def set_output_embeddings(self, new_embeddings):
        self.decoder = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, *, indices=None,
                cu_seqlens=None, max_seqlen=None):
        """``MaskedLMOutput``: logits ``(batch, seqlen, vocab_size)`` (0 at padding when unpadded), mean
        cross-entropy over ``labels != -100``."""
        enc = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, labels = token_logits(lambda h: self.decoder(self.head(h)), enc, labels, self.sparse_prediction)
        return task_output("masked_lm", self, logits, labels, enc, return_dict)


class ModernBertForSequenceClassification(_ModernBertHead):
    """``classifier(drop(head(pool(h))))`` with ``classifier_pooling`` ``"cls"`` (position 0) or
    ``"mean"`` (over real tokens); loss per ``problem_type`` (:mod:`fastbert.models.heads`)."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        if config.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling: expected 'cls' or 'mean', got {config.classifier_pooling!r}")
        self._build_classifier(config, unpad, backend)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, *, indices=None,
                cu_seqlens=None, max_seqlen=None):
        """``SequenceClassifierOutput``: logits ``(batch, num_labels)``."""
        enc = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, indices, cu_seqlens, max_seqlen)
        h = enc.last_hidden_state
        if self.config.classifier_pooling == "cls":
            pooled = h[:, 0]
        else:
            mask = (torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if attention_mask is None
                    else attention_mask.to(h.device))
            pooled = (h * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        logits = self.classifier(self.drop(self.head(pooled)))
        return task_output("sequence", self, logits, labels, enc, return_dict)


class ModernBertForTokenClassification(_ModernBertHead):
    """``classifier(drop(head(h)))`` per token; logits ``(batch, seqlen, num_labels)`` (0 at padding
    when unpadded); mean cross-entropy over ``labels != -100``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build_classifier(config, unpad, backend)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, *, indices=None,
                cu_seqlens=None, max_seqlen=None):
        """``TokenClassifierOutput``."""
        enc = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, labels = token_logits(lambda h: self.classifier(self.drop(self.head(h))), enc, labels)
        return task_output("token", self, logits, labels, enc, return_dict)


__all__ = ["ModernBertPreTrainedModel", "ModernBertModel", "ModernBertForMaskedLM",
           "ModernBertForSequenceClassification", "ModernBertForTokenClassification"]
