"""DistilBERT (Sanh et al. 2019): BERT's post-norm encoder under its own module names
(``distilbert.transformer.layer.N.{attention.{q,k,v,out}_lin, sa_layer_norm, ffn.lin1/2,
output_layer_norm}``, :class:`fastbert.nn.bert.DistilBertBlock`), no token types, no pooler.
Config fields: ``dim``, ``n_heads``, ``n_layers``, ``hidden_dim``, ``activation``, ``dropout``,
``attention_dropout``, ``seq_classif_dropout``, ``qa_dropout``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import DistilBertConfig

from fastbert.models._base import EncoderModelMixin, FastbertPreTrainedModel, base_output
from fastbert.models.heads import (MaskedLMTask, MultipleChoiceTask, QuestionAnsweringTask,
                                   SequenceClassificationTask, TokenClassificationTask)
from fastbert.models.electra import _act
from fastbert.nn import DistilBertBlock, Embeddings, Encoder, LayerNorm


class DistilBertPreTrainedModel(FastbertPreTrainedModel):
    """Base of the DistilBERT classes: ``DistilBertConfig``, weights under ``distilbert.``."""

    config_class = DistilBertConfig
    base_model_prefix = "distilbert"


class DistilBertModel(EncoderModelMixin, DistilBertPreTrainedModel):
    """Embeddings (word + position, LayerNorm eps 1e-12) -> ``transformer`` (N DistilBERT blocks).
    forward as :meth:`fastbert.models.BertModel.forward` without token_type_ids; returns
    ``BaseModelOutput`` (last_hidden_state, hidden_states, attentions)."""

    encoder_name = "transformer"

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self.embeddings = Embeddings(config.vocab_size, config.dim, config.max_position_embeddings, type_vocab_size=0,
                                     pad_token_id=config.pad_token_id, layer_norm_eps=1e-12, dropout_p=config.dropout)
        self.transformer = Encoder(DistilBertBlock(config) for _ in range(config.n_layers))
        self._unpad = unpad
        self._fastbert_init(backend)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, *, indices: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
        enc = self.encode(input_ids, attention_mask, None, position_ids, inputs_embeds, output_attentions,
                          output_hidden_states, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return base_output(self.config, enc, return_dict)


class _DistilBertHead(DistilBertPreTrainedModel):
    def _build(self, config, unpad: bool) -> None:
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config, unpad=unpad)

    def _first_token(self, hidden: Tensor) -> Tensor:
        """``dropout(relu(pre_classifier(h[:, 0])))`` (sequence classification, multiple choice)."""
        return self.dropout(torch.relu(self.pre_classifier(hidden[:, 0])))


class DistilBertForMaskedLM(MaskedLMTask, _DistilBertHead):
    """``vocab_projector(vocab_layer_norm(act(vocab_transform(h))))``; the projector is tied to
    the word embeddings."""

    _tied_weights_keys = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: bool = False):
        super().__init__(config)
        self.activation = _act(config.activation)
        self._build(config, unpad)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = LayerNorm(config.dim, eps=1e-12)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.sparse_prediction = sparse_prediction
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.vocab_projector(self.vocab_layer_norm(self.activation(self.vocab_transform(hidden))))

    def get_output_embeddings(self):
        return self.vocab_projector

    def set_output_embeddings(self, new_embeddings):
        self.vocab_projector = new_embeddings


class DistilBertForSequenceClassification(SequenceClassificationTask, _DistilBertHead):
    """transformers' ``DistilBertForSequenceClassification``: logits ``(batch, num_labels)``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self._first_token(hidden))


class DistilBertForMultipleChoice(MultipleChoiceTask, _DistilBertHead):
    """transformers' ``DistilBertForMultipleChoice``: logits ``(batch, num_choices)``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, 1)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self._first_token(hidden))


class DistilBertForTokenClassification(TokenClassificationTask, _DistilBertHead):
    """transformers' ``DistilBertForTokenClassification``: logits ``(batch, seqlen, num_labels)``;
    its dropout is ``config.dropout``."""

    @staticmethod
    def _head_dropout(config) -> float:
        return config.dropout


class DistilBertForQuestionAnswering(QuestionAnsweringTask, _DistilBertHead):
    """``qa_outputs(dropout(h))`` (``qa_dropout``).

    Raises:
        ValueError: ``num_labels`` is not 2 (as transformers).
    """

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        if config.num_labels != 2:
            raise ValueError(f"num_labels: DistilBertForQuestionAnswering expects 2, got {config.num_labels}")
        super().__init__(config, unpad=unpad, backend=backend)

    @staticmethod
    def _head_dropout(config) -> float:
        return config.qa_dropout
