"""The tiny ModernBERT that test_modernbert.py (fastbert's model) and test_patch_modernbert.py
(``patch()`` on transformers' model) compare against transformers: the config, the heads, random
-weight checkpoints and the batch of mixed lengths longer than the local window. Imports
transformers only when called (the callers skip without it)."""

from __future__ import annotations

import torch

TOL = dict(atol=1e-4, rtol=1e-4)
LENGTHS = (21, 13, 9, 1)  # the window is 8 keys wide (4 each side): every length but 1 exceeds it
SEQLEN = 21
HEADS = {"model": ("ModernBertModel", {}), "mlm": ("ModernBertForMaskedLM", {}),
         "seq": ("ModernBertForSequenceClassification", {}),
         "seq_mean": ("ModernBertForSequenceClassification", {"classifier_pooling": "mean"}),
         "tok": ("ModernBertForTokenClassification", {})}


def tiny_config(biases: bool = False, **kw):
    """A ``transformers.ModernBertConfig`` of 4 layers: global, local, local, global (layer_types
    from global_attn_every_n_layers=3), window 8 (4 a side)."""
    import transformers

    return transformers.ModernBertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, norm_bias=biases, attention_bias=biases,
        mlp_bias=biases, classifier_bias=biases, num_labels=3, global_rope_theta=160_000.0,
        local_rope_theta=10_000.0, **kw)


def save_checkpoint(tmp_path_factory, head: str, biases: bool):
    """A random-weight ``head`` checkpoint written by transformers (from torch's current seed), its
    norms and biases perturbed so a missed weight or bias shows; returns its folder."""
    import transformers

    cls, extra = HEADS[head]
    model = getattr(transformers, cls)(tiny_config(biases, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(f"{head}_{biases}")
    model.save_pretrained(path)
    return path


def batch(left: bool = False):
    """``(input_ids, attention_mask)`` of ``LENGTHS`` real tokens in ``SEQLEN``, right (or left) padded."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 97, (len(LENGTHS), SEQLEN), generator=g)
    mask = torch.zeros(len(LENGTHS), SEQLEN, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        if left:
            mask[i, SEQLEN - n:] = 1
        else:
            mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask
