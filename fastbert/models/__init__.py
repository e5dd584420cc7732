"""BERT-family models on fastbert ops as transformers ``PreTrainedModel`` classes: transformers'
configs (``BertConfig``, ``RobertaConfig``, ``ModernBertConfig``, ...), outputs, ``from_pretrained`` /
``save_pretrained``, every head (ModernBERT: base, masked LM, sequence and token classification), and
fastbert's own Auto classes (:mod:`fastbert.models.auto`). Needs transformers
(``pip install fastbert[hf]``). fastbert-only keywords: ``unpad``, ``backend``, ``sparse_prediction``
(:mod:`fastbert.models._base`, :mod:`fastbert.models.heads`). The config classes are transformers'
own, re-exported here for convenience."""

from fastbert.models.auto import (SUPPORTED_MODEL_TYPES, AutoModel, AutoModelForMaskedLM,
                                  AutoModelForMultipleChoice, AutoModelForNextSentencePrediction,
                                  AutoModelForPreTraining, AutoModelForQuestionAnswering,
                                  AutoModelForSequenceClassification, AutoModelForTokenClassification)
from fastbert.models.bert import (BertForMaskedLM, BertForMultipleChoice, BertForNextSentencePrediction,
                                  BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                                  BertForTokenClassification, BertModel, BertPreTrainedModel)
from fastbert.models.distilbert import (DistilBertForMaskedLM, DistilBertForMultipleChoice,
                                        DistilBertForQuestionAnswering, DistilBertForSequenceClassification,
                                        DistilBertForTokenClassification, DistilBertModel)
from fastbert.models.modernbert import (ModernBertForMaskedLM, ModernBertForSequenceClassification,
                                        ModernBertForTokenClassification, ModernBertModel, ModernBertPreTrainedModel)
from fastbert.models.electra import (ElectraForMaskedLM, ElectraForMultipleChoice, ElectraForPreTraining,
                                     ElectraForQuestionAnswering, ElectraForSequenceClassification,
                                     ElectraForTokenClassification, ElectraModel)
from fastbert.models.roberta import (  # RoBERTa, XLM-RoBERTa, CamemBERT
    RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaForMultipleChoice,
    RobertaForTokenClassification, RobertaForQuestionAnswering, XLMRobertaModel, XLMRobertaForMaskedLM,
    XLMRobertaForSequenceClassification, XLMRobertaForMultipleChoice, XLMRobertaForTokenClassification,
    XLMRobertaForQuestionAnswering, CamembertModel, CamembertForMaskedLM,
    CamembertForSequenceClassification, CamembertForMultipleChoice, CamembertForTokenClassification,
    CamembertForQuestionAnswering)
from fastbert.nn.padding import pad_input, unpad_input, unpad_metadata
from transformers import (BertConfig, CamembertConfig, DistilBertConfig, ElectraConfig,  # noqa: E402  re-exported
                          ModernBertConfig, RobertaConfig, XLMRobertaConfig)

__all__ = ["AutoModel", "AutoModelForPreTraining", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
           "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice",
           "AutoModelForNextSentencePrediction", "SUPPORTED_MODEL_TYPES",
           "BertModel", "BertPreTrainedModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice", "ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM",
           "ElectraForSequenceClassification", "ElectraForTokenClassification", "ElectraForQuestionAnswering",
           "ElectraForMultipleChoice", "DistilBertModel", "DistilBertForMaskedLM",
           "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
           "DistilBertForQuestionAnswering", "DistilBertForMultipleChoice", "RobertaModel", "RobertaForMaskedLM",
           "RobertaForSequenceClassification",
           "RobertaForMultipleChoice", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
           "XLMRobertaModel", "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification",
           "XLMRobertaForMultipleChoice", "XLMRobertaForTokenClassification",
           "XLMRobertaForQuestionAnswering", "CamembertModel", "CamembertForMaskedLM",
           "CamembertForSequenceClassification", "CamembertForMultipleChoice",
           "CamembertForTokenClassification", "CamembertForQuestionAnswering",
           "unpad_input", "pad_input", "unpad_metadata", "BertConfig", "RobertaConfig", "XLMRobertaConfig",
           "CamembertConfig", "ElectraConfig", "DistilBertConfig", "ModernBertModel", "ModernBertPreTrainedModel",
           "ModernBertForMaskedLM", "ModernBertForSequenceClassification", "ModernBertForTokenClassification",
           "ModernBertConfig"]
