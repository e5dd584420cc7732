"""Drop-in modules on :mod:`fastbert.ops`: ``LayerNorm``, ``GELU``, BERT blocks, ``swap_modules``,
the unpadded encoder (:mod:`fastbert.nn.encoder`) and the unpad/pad helpers of the packed (varlen)
layout (:mod:`fastbert.nn.padding`). Needs torch alone (no transformers)."""

from fastbert.nn.bert import (BertAttention, BertIntermediate, BertLayer, BertOutput, BertSelfAttention,
                              BertSelfOutput, DistilBertBlock, attention_probs, self_attention)
from fastbert.nn.encoder import Embeddings, Encoder, EncoderOutput, PreNormLayer
from fastbert.nn.modules import GELU, LayerNorm, OpsModule, resolve_activation, set_backend, swap_modules
from fastbert.nn.padding import pad_input, unpad_input, unpad_metadata

__all__ = ["LayerNorm", "GELU", "swap_modules", "set_backend", "OpsModule", "resolve_activation",
           "BertSelfAttention", "BertSelfOutput", "BertAttention", "BertIntermediate", "BertOutput",
           "BertLayer", "DistilBertBlock", "attention_probs", "self_attention", "Encoder", "EncoderOutput",
           "Embeddings", "PreNormLayer", "unpad_input", "pad_input", "unpad_metadata"]
