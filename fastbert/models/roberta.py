"""RoBERTa (Liu et al. 2019), XLM-RoBERTa (Conneau et al. 2020) and CamemBERT (Martin et al. 2020).

BERT's encoder with two switches: positions start at ``padding_idx + 1`` (counted over non-pad
tokens of ``input_ids``; pad tokens get ``padding_idx``), and the heads are RoBERTa's (``lm_head``
with an exact GELU, ``classifier.dense / out_proj`` on the first token, no NSP). XLM-R and
CamemBERT are the same modules on their own config classes (so ``model_type`` survives a save).
transformers maps ``AutoModelForPreTraining`` of these families to their ``ForMaskedLM``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import CamembertConfig, RobertaConfig, XLMRobertaConfig

from fastbert.models.bert import BertModel, bert_embeddings
from fastbert.models._base import FastbertPreTrainedModel
from fastbert.models.heads import (MaskedLMTask, MultipleChoiceTask, QuestionAnsweringTask, classifier_dropout,
                                   SequenceClassificationTask, TokenClassificationTask)
from fastbert.nn import LayerNorm, OpsModule
from fastbert.ops import gelu


class RobertaPreTrainedModel(FastbertPreTrainedModel):
    """Base of the RoBERTa classes: transformers' ``RobertaConfig``, weights under ``roberta.``."""

    config_class = RobertaConfig
    base_model_prefix = "roberta"


class RobertaModel(BertModel, RobertaPreTrainedModel):
    """BERT's encoder with RoBERTa's position ids (see the module docstring); forward as
    :meth:`fastbert.models.BertModel.forward`."""

    config_class = RobertaConfig
    base_model_prefix = "roberta"

    def __init__(self, config, add_pooling_layer: bool = True, *, unpad: bool = True,
                 backend: Optional[str] = None):
        super().__init__(config, add_pooling_layer, unpad=unpad, backend=backend,
                         embeddings=bert_embeddings(config, position_padding_idx=config.pad_token_id))


class RobertaLMHead(OpsModule, nn.Module):
    """``decoder(layer_norm(gelu(dense(h))))`` (exact GELU whatever ``hidden_act``); decoder tied to
    the word embeddings, its bias to ``bias``."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, features: Tensor) -> Tensor:
        h = gelu(nn.functional.linear(features, self.dense.weight), bias=self.dense.bias, backend=self.backend)
        return self.decoder(self.layer_norm(h))


class RobertaClassificationHead(nn.Module):
    """``out_proj(dropout(act(dense(dropout(h[:, 0])))))`` on the first (``<s>``) token; ``act`` is
    tanh here, GELU in ELECTRA's subclass."""

    act = staticmethod(torch.tanh)

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: Tensor) -> Tensor:
        x = self.dropout(features[:, 0])
        return self.out_proj(self.dropout(self.act(self.dense(x))))


class _RobertaHead:
    """Builds ``self.roberta`` of the class's family (``_base_class``)."""

    _base_class = RobertaModel

    def _build(self, config, add_pooling_layer: bool = False, unpad: bool = True) -> None:
        self.num_labels = config.num_labels
        self.roberta = self._base_class(config, add_pooling_layer=add_pooling_layer, unpad=unpad)


class RobertaForMaskedLM(MaskedLMTask, _RobertaHead, RobertaPreTrainedModel):
    """``lm_head`` on every real token (or the labelled ones with ``sparse_prediction``)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                          "lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None,
                 sparse_prediction: bool = False):
        super().__init__(config)
        self._build(config, False, unpad)
        self.lm_head = RobertaLMHead(config)
        self.sparse_prediction = sparse_prediction
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.lm_head(hidden)

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings


class RobertaForSequenceClassification(SequenceClassificationTask, _RobertaHead, RobertaPreTrainedModel):
    """:class:`RobertaClassificationHead` on the first token; no pooler."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, False, unpad)
        self.classifier = RobertaClassificationHead(config)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(hidden)


class RobertaForMultipleChoice(MultipleChoiceTask, _RobertaHead, RobertaPreTrainedModel):
    """``classifier(dropout(pooler_output))`` per choice (this head keeps the pooler)."""

    def __init__(self, config, *, unpad: bool = True, backend: Optional[str] = None):
        super().__init__(config)
        self._build(config, True, unpad)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._fastbert_init(backend)

    def _head(self, hidden):
        return self.classifier(self.dropout(self.roberta.pooler(hidden)))


class RobertaForTokenClassification(TokenClassificationTask, _RobertaHead, RobertaPreTrainedModel):
    """transformers' ``RobertaForTokenClassification``: logits ``(batch, seqlen, num_labels)`` (0 at padding when unpadded)."""


class RobertaForQuestionAnswering(QuestionAnsweringTask, _RobertaHead, RobertaPreTrainedModel):
    """transformers' ``RobertaForQuestionAnswering``: start / end logits ``(batch, seqlen)``."""


# ---- XLM-RoBERTa and CamemBERT: the same modules on their own config classes ----------------------


def _family(prefix: str, config_class, namespace: dict) -> None:
    """Define ``{prefix}Model``, ``{prefix}ForMaskedLM``, ... as RoBERTa's classes on ``config_class``."""
    base = type(f"{prefix}Model", (RobertaModel,), {"config_class": config_class, "__module__": __name__,
                                                    "__doc__": f"RobertaModel on {config_class.__name__}."})
    namespace[base.__name__] = base
    for roberta_cls in (RobertaForMaskedLM, RobertaForSequenceClassification, RobertaForMultipleChoice,
                        RobertaForTokenClassification, RobertaForQuestionAnswering):
        name = roberta_cls.__name__.replace("Roberta", prefix, 1)
        namespace[name] = type(name, (roberta_cls,), {"config_class": config_class, "_base_class": base,
                                                      "__module__": __name__,
                                                      "__doc__": f"{roberta_cls.__name__} on {config_class.__name__}."})


_family("XLMRoberta", XLMRobertaConfig, globals())
_family("Camembert", CamembertConfig, globals())

__all__ = ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForMultipleChoice",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering"] + [
    f"{p}{s}" for p in ("XLMRoberta", "Camembert")
    for s in ("Model", "ForMaskedLM", "ForSequenceClassification", "ForMultipleChoice", "ForTokenClassification",
              "ForQuestionAnswering")]
