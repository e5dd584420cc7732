"""BERT models on fastbert ops with Hugging Face's names, state_dict keys and outputs."""

from fastbert.models.bert import (BaseModelOutputWithPoolingAndCrossAttentions, BertConfig,
                                  BertForMaskedLM, BertForPreTraining, BertForPreTrainingOutput,
                                  BertForSequenceClassification, BertModel, BertPreTrainedModel,
                                  MaskedLMOutput, SequenceClassifierOutput)
from fastbert.nn.padding import pad_input, unpad_input, unpad_metadata

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM",
           "BertForSequenceClassification", "BertPreTrainedModel",
           "BaseModelOutputWithPoolingAndCrossAttentions", "BertForPreTrainingOutput", "MaskedLMOutput",
           "SequenceClassifierOutput", "unpad_input", "pad_input", "unpad_metadata"]
