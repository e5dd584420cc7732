"""ELECTRA (Clark et al. 2020): BERT's encoder behind embeddings of width ``embedding_size``
(projected by ``embeddings_project`` when it differs from ``hidden_size``), no pooler.

``ElectraForPreTraining`` is the discriminator (replaced-token detection: one logit per token,
BCE over real tokens), which transformers' ``AutoModelForPreTraining`` maps ``electra`` to;
``ElectraForMaskedLM`` is the generator's head.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ElectraConfig

from fastbert.models._base import FastbertPreTrainedModel
from fastbert.models.bert import BertModel, bert_embeddings
from fastbert.models.roberta import RobertaClassificationHead
from fastbert.models.heads import (MaskedLMTask, MultipleChoiceTask, QuestionAnsweringTask,
                                   SequenceClassificationTask, TaskModel, TokenClassificationTask, task_output,
                                   token_logits)
from fastbert.nn import LayerNorm, resolve_activation


def _act(name: str):
    """transformers' ``get_activation(name)`` for the GELU / torch activations fastbert knows."""
    approximate, fn = resolve_activation(name)
    return fn if fn is not None else (lambda x: F.gelu(x, approximate=approximate))


class ElectraPreTrainedModel(FastbertPreTrainedModel):
    """Base of the ELECTRA classes: transformers' ``ElectraConfig``, weights under ``electra.``."""

    config_class = ElectraConfig
    base_model_prefix = "electra"


class ElectraModel(BertModel, ElectraPreTrainedModel):
    """Embeddings (``embedding_size``) -> ``embeddings_project`` (if needed) -> encoder; no pooler
    (``pooler_output`` is None). forward as :meth:`fastbert.models.BertModel.forward`."""

    config_class = ElectraConfig
    base_model_prefix = "electra"

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config, False, unpad=unpad, backend=None,
                         embeddings=bert_embeddings(config, width=config.embedding_size))
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        self._fastbert_init(backend)


class ElectraDiscriminatorPredictions(nn.Module):
    """``dense_prediction(act(dense(h)))`` -> one replaced-token logit per token."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = _act(config.hidden_act)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.dense_prediction(self.activation(self.dense(hidden))).squeeze(-1)


class ElectraGeneratorPredictions(nn.Module):
    """``LayerNorm(gelu(dense(h)))`` down to ``embedding_size``."""

    def __init__(self, config):
        super().__init__()
        self.LayerNorm = LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class ElectraClassificationHead(RobertaClassificationHead):
    """RoBERTa's classification head with ELECTRA's exact GELU where RoBERTa has tanh."""

    act = staticmethod(F.gelu)


class ElectraSequenceSummary(nn.Module):
    """transformers' sequence summary for multiple choice: ``summary_type`` first / last / mean,
    then ``summary`` (Linear when ``summary_use_proj``), ``summary_activation``, dropouts.

    Raises:
        NotImplementedError: ``summary_type`` ``cls_index`` or ``attn``.
    """

    def __init__(self, config):
        super().__init__()
        self.summary_type = getattr(config, "summary_type", "last")
        if self.summary_type not in ("first", "last", "mean"):
            raise NotImplementedError(f"summary_type: expected 'first', 'last' or 'mean', got {self.summary_type!r}")
        self.summary = nn.Identity()
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = nn.Linear(config.hidden_size, config.num_labels if to_labels else config.hidden_size)
        name = getattr(config, "summary_activation", None)
        self.activation = _act(name) if name else (lambda x: x)
        self.first_dropout = nn.Dropout(getattr(config, "summary_first_dropout", 0.0) or 0.0)
        self.last_dropout = nn.Dropout(getattr(config, "summary_last_dropout", 0.0) or 0.0)

    def forward(self, hidden: Tensor) -> Tensor:
        x = {"first": lambda: hidden[:, 0], "last": lambda: hidden[:, -1],
             "mean": lambda: hidden.mean(dim=1)}[self.summary_type]()
        return self.last_dropout(self.activation(self.summary(self.first_dropout(x))))


class _ElectraHead(ElectraPreTrainedModel):
    def _build(self, config, unpad: bool) -> None:
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config, unpad=unpad)


class ElectraForPreTraining(TaskModel, _ElectraHead):
    """The discriminator: logits ``(batch, seqlen)`` (0 at padding when unpadded); ``labels``
    ``(batch, seqlen)`` 1 = replaced; loss = BCE with logits over tokens with attention_mask 1."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        self._fastbert_init(backend)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, *, indices=None, cu_seqlens=None, max_seqlen=None):
        enc = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_attentions, output_hidden_states, indices, cu_seqlens, max_seqlen)
        logits, _ = token_logits(self.discriminator_predictions, enc)
        return task_output("replaced_token", self, logits, labels, enc, return_dict, attention_mask=attention_mask)


class ElectraForMaskedLM(MaskedLMTask, _ElectraHead):
    """The generator head: ``generator_lm_head(generator_predictions(h))``, tied to the word embeddings."""

    _tied_weights_keys = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: bool = False):
        super().__init__(config)
        self._build(config, unpad)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        self.sparse_prediction = sparse_prediction
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.generator_lm_head(self.generator_predictions(hidden))

    def get_output_embeddings(self):
        return self.generator_lm_head

    def set_output_embeddings(self, new_embeddings):
        self.generator_lm_head = new_embeddings


class ElectraForSequenceClassification(SequenceClassificationTask, _ElectraHead):
    """transformers' ``ElectraForSequenceClassification``: logits ``(batch, num_labels)`` from the first token."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.classifier = ElectraClassificationHead(config)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(hidden)


class ElectraForMultipleChoice(MultipleChoiceTask, _ElectraHead):
    """transformers' ``ElectraForMultipleChoice``: inputs ``(batch, num_choices, seqlen)``, logits ``(batch, num_choices)``."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, unpad)
        self.sequence_summary = ElectraSequenceSummary(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self.sequence_summary(hidden))


class ElectraForTokenClassification(TokenClassificationTask, _ElectraHead):
    """transformers' ``ElectraForTokenClassification``: logits ``(batch, seqlen, num_labels)`` (0 at padding when unpadded)."""


class ElectraForQuestionAnswering(QuestionAnsweringTask, _ElectraHead):
    """transformers' ``ElectraForQuestionAnswering``: start / end logits ``(batch, seqlen)``."""
