"""BERT (Devlin et al. 2019) with every transformers head, on fastbert ops.

Module names and state_dict keys are transformers' (``bert.embeddings.*``, ``bert.encoder.layer.N.*``,
``bert.pooler.dense``, ``cls.predictions.*``, ``cls.seq_relationship``, ``classifier``, ``qa_outputs``),
so a checkpoint saved by either library loads strictly in the other. The configs, outputs and
checkpoint IO are transformers' (:mod:`fastbert.models._base` lists the fastbert-only keywords).
The other families reuse these modules with small switches (roberta.py, electra.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import BertConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from fastbert.models._base import EncoderModelMixin, FastbertPreTrainedModel, base_output
from fastbert.models.heads import (MaskedLMTask, MultipleChoiceTask, QuestionAnsweringTask,
                                   SequenceClassificationTask, TaskModel, TokenClassificationTask,
                                   classifier_dropout, task_output, token_logits)
from fastbert.nn import BertLayer, Embeddings, Encoder, LayerNorm, OpsModule
from fastbert.nn.bert import _dense_act
from fastbert.nn.modules import resolve_activation


def check_encoder_config(config) -> None:
    """fastbert runs bidirectional encoders with absolute positions.

    Raises:
        NotImplementedError: ``is_decoder``, ``add_cross_attention`` or a ``position_embedding_type``
            other than ``"absolute"`` (named).
    """
    for field, bad in (("is_decoder", True), ("add_cross_attention", True)):
        if getattr(config, field, False) == bad:
            raise NotImplementedError(f"{field}: fastbert runs bidirectional encoders only, got {field}=True")
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise NotImplementedError(f"position_embedding_type: only 'absolute' is supported, got {kind!r}")


def bert_embeddings(config, *, width: Optional[int] = None, position_padding_idx: Optional[int] = None) -> Embeddings:
    """BERT's embeddings from a config (ELECTRA: ``width=embedding_size``; RoBERTa:
    ``position_padding_idx=pad_token_id``); token types from ``type_vocab_size``."""
    return Embeddings(config.vocab_size, width or config.hidden_size, config.max_position_embeddings,
                      type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id,
                      layer_norm_eps=config.layer_norm_eps, dropout_p=config.hidden_dropout_prob,
                      position_padding_idx=position_padding_idx)


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the first ([CLS]) token's final hidden state."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class BertPredictionHeadTransform(OpsModule, nn.Module):
    """``LayerNorm(act(dense(h)))``; a GELU fuses the dense bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.approximate, self.act_fn = resolve_activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(_dense_act(self, self.dense, hidden_states))


class BertLMPredictionHead(nn.Module):
    """Masked-LM scores ``decoder(transform(h))``: ``(..., hidden)`` -> ``(..., vocab_size)``; the
    decoder weight is tied to the word embeddings and its bias to ``bias`` (``_tied_weights_keys``)."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    """transformers' ``cls`` of ``BertForMaskedLM``: ``predictions`` -> logits ``(..., vocab_size)``."""

    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.predictions(sequence_output)


class BertOnlyNSPHead(nn.Module):
    """Next-sentence head: pooled ``(batch, hidden)`` -> logits ``(batch, 2)`` (0 = B follows A)."""

    def __init__(self, config):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertPreTrainingHeads(nn.Module):
    """``cls``: MLM scores (``predictions``) and NSP scores ``(batch, 2)`` (``seq_relationship``;
    BERT paper sec. 3.1, label 0 = IsNext)."""

    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertPreTrainedModel(FastbertPreTrainedModel):
    """Base of the BERT classes: transformers' ``BertConfig``, weights under ``bert.``."""

    config_class = BertConfig
    base_model_prefix = "bert"


class BertModel(EncoderModelMixin, BertPreTrainedModel):
    """The BERT encoder: embeddings -> N post-norm layers (:class:`fastbert.nn.BertLayer`) -> pooler.

    Args:
        config: ``transformers.BertConfig``.
        add_pooling_layer: build the pooler (``pooler_output`` is None without it).
        unpad, backend: see :mod:`fastbert.models._base`.
    """

    def __init__(self, config, add_pooling_layer: bool = True, *, unpad: bool = True,
                 backend: Optional[str] = None, embeddings: Optional[nn.Module] = None):
        super().__init__(config)
        check_encoder_config(config)
        self.embeddings = embeddings if embeddings is not None else bert_embeddings(config)
        self.encoder = Encoder(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self._unpad = unpad
        self._fastbert_init(backend)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, *,
                indices: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None):
        """Encode a padded batch.

        Args (transformers' names and defaults):
            input_ids: ``(batch, seqlen)`` integer token ids; or ``inputs_embeds``
                ``(batch, seqlen, hidden)`` (exactly one of the two).
            attention_mask: ``(batch, seqlen)``, 1 / True = real token, 0 = padding; None = all real.
            token_type_ids: ``(batch, seqlen)`` segment ids (default 0).
            position_ids: ``(batch or 1, seqlen)`` (default ``0..seqlen-1``; RoBERTa's from input_ids).
            output_attentions: also return per-layer attention probabilities (a separate plain-torch
                pass; before dropout). output_hidden_states: embeddings + every layer's output.
            return_dict: the output dataclass (default) or its non-None fields as a tuple.
            indices, cu_seqlens, max_seqlen: precomputed ``unpad_metadata(attention_mask)`` for the
                unpadded mode, so a compiled caller avoids the host sync (they imply the unpadded
                mode and take precedence over ``attention_mask``; indices and cu_seqlens come together).

        Returns:
            ``BaseModelOutputWithPoolingAndCrossAttentions``: last_hidden_state ``(batch, seqlen,
            hidden)`` (zeros at padding when unpadded), pooler_output ``(batch, hidden)`` (from
            position 0: with left padding in the unpadded mode that row is zeros), hidden_states,
            attentions.

        Raises:
            ValueError: both or neither of input_ids / inputs_embeds; wrong ndim; a wrongly shaped or
                additive attention_mask; ids out of range; only one of indices / cu_seqlens.
            TypeError: non-integer input_ids.
        """
        enc = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                          output_attentions, output_hidden_states, indices=indices, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen)
        pooled = self.pooler(enc.last_hidden_state) if self.pooler is not None else None
        return base_output(self.config, enc, return_dict, BaseModelOutputWithPoolingAndCrossAttentions,
                           pooler_output=pooled)


_MLM_TIES = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"}


class _BertHead(BertPreTrainedModel):
    """A task model: ``self.bert`` plus head modules named as transformers'."""

    def _build(self, config, add_pooling_layer: bool = False, unpad: bool = True) -> None:
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer, unpad=unpad)

    def _pooled(self, hidden: Tensor) -> Tensor:
        return self.bert.pooler(hidden)


class _MLMOutputEmbeddings:
    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias


class BertForPreTraining(_MLMOutputEmbeddings, TaskModel, _BertHead):
    """MLM + NSP heads (Devlin et al. 2019 sec. 3.1). Loss (appendix A.2): mean MLM cross-entropy
    over labelled positions + mean NSP cross-entropy, only when both ``labels`` ``(batch, seqlen)``
    and ``next_sentence_label`` ``(batch,)`` are given. ``sparse_prediction``: see heads.py."""

    _tied_weights_keys = _MLM_TIES

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: bool = False):
        super().__init__(config)
        self._build(config, True, unpad)
        self.cls = BertPreTrainingHeads(config)
        self.sparse_prediction = sparse_prediction
        self._fastbert_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        scores, labels = token_logits(self.cls.predictions, enc, labels, self.sparse_prediction)
        nsp = self.cls.seq_relationship(self._pooled(enc.last_hidden_state))
        return task_output("pretraining", self, (scores, nsp), labels, enc, return_dict,
                           next_sentence_label=next_sentence_label)


class BertForMaskedLM(_MLMOutputEmbeddings, MaskedLMTask, _BertHead):
    """The MLM head (``cls.predictions``); no pooler. ``sparse_prediction``: see heads.py."""

    _tied_weights_keys = _MLM_TIES

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: bool = False):
        super().__init__(config)
        self._build(config, False, unpad)
        self.cls = BertOnlyMLMHead(config)
        self.sparse_prediction = sparse_prediction
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.cls(hidden)


class BertForNextSentencePrediction(TaskModel, _BertHead):
    """The NSP head ``cls.seq_relationship`` on the pooled output; logits ``(batch, 2)``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, True, unpad)
        self.cls = BertOnlyNSPHead(config)
        self._fastbert_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits = self.cls.seq_relationship(self._pooled(enc.last_hidden_state))
        return task_output("nsp", self, logits, labels, enc, return_dict)


class BertForSequenceClassification(SequenceClassificationTask, _BertHead):
    """``classifier(dropout(pooler_output))``; loss per ``problem_type`` (heads.py)."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, True, unpad)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self.dropout(self._pooled(hidden)))


class BertForMultipleChoice(MultipleChoiceTask, _BertHead):
    """``classifier(dropout(pooler_output))`` per choice -> ``(batch, num_choices)``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, True, unpad)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self.dropout(self._pooled(hidden)))


class BertForTokenClassification(TokenClassificationTask, _BertHead):
    """``classifier(dropout(h))`` per token; no pooler (built by :class:`TokenClassificationTask`)."""


class BertForQuestionAnswering(QuestionAnsweringTask, _BertHead):
    """``qa_outputs(h)`` -> start / end logits; no pooler (built by :class:`QuestionAnsweringTask`)."""
