"""Drop-in modules on :mod:`fastbert.ops`: ``LayerNorm``, ``GELU``, BERT blocks, ``swap_modules``,
and the unpad/pad helpers of the packed (varlen) layout (:mod:`fastbert.nn.padding`)."""

from fastbert.nn.bert import (BertAttention, BertIntermediate, BertLayer, BertOutput, BertSelfAttention,
                              BertSelfOutput, attention_probs)
from fastbert.nn.modules import GELU, LayerNorm, OpsModule, resolve_activation, set_backend, swap_modules
from fastbert.nn.padding import pad_input, unpad_input, unpad_metadata

__all__ = ["LayerNorm", "GELU", "swap_modules", "set_backend", "OpsModule", "resolve_activation",
           "BertSelfAttention", "BertSelfOutput", "BertAttention", "BertIntermediate", "BertOutput",
           "BertLayer", "attention_probs", "unpad_input", "pad_input", "unpad_metadata"]
