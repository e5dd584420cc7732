"""Shared cases for the transformers-model tests: tiny configs per family, batches of mixed
lengths (real tokens only compared), labels per head, and the family x head matrix."""

from __future__ import annotations

import torch

FAMILIES = {  # model_type -> (transformers config class name, class prefix, its heads)
    "bert": ("BertConfig", "Bert", ("Model", "ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction",
                                    "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                                    "ForMultipleChoice")),
    "roberta": ("RobertaConfig", "Roberta", ("Model", "ForMaskedLM", "ForSequenceClassification",
                                             "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta", ("Model", "ForMaskedLM", "ForSequenceClassification",
                                                       "ForTokenClassification", "ForQuestionAnswering",
                                                       "ForMultipleChoice")),
    "camembert": ("CamembertConfig", "Camembert", ("Model", "ForMaskedLM", "ForSequenceClassification",
                                                   "ForTokenClassification", "ForQuestionAnswering",
                                                   "ForMultipleChoice")),
    "electra": ("ElectraConfig", "Electra", ("Model", "ForPreTraining", "ForMaskedLM", "ForSequenceClassification",
                                             "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")),
    "distilbert": ("DistilBertConfig", "DistilBert", ("Model", "ForMaskedLM", "ForSequenceClassification",
                                                      "ForTokenClassification", "ForQuestionAnswering",
                                                      "ForMultipleChoice")),
}
# The default run: BERT with every head, one head per other family; the rest behind -m slow.
DEFAULT_HEADS = {"roberta": "ForMaskedLM", "xlm-roberta": "ForSequenceClassification",
                 "camembert": "ForQuestionAnswering", "electra": "ForPreTraining",
                 "distilbert": "ForTokenClassification"}
VOCAB, SEQLEN, PAD = 99, 11, 1


def tiny_config(transformers, model_type: str, **kw):
    """A random-weight-sized config (hidden 32, 4 heads of 8, 2 layers), dropout on (tests run eval)."""
    cls = getattr(transformers, FAMILIES[model_type][0])
    if model_type == "distilbert":
        base = dict(vocab_size=VOCAB, dim=32, n_heads=4, n_layers=2, hidden_dim=48, max_position_embeddings=40,
                    pad_token_id=PAD, num_labels=3)
    else:
        base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                    intermediate_size=48, max_position_embeddings=40, pad_token_id=PAD, num_labels=3,
                    type_vocab_size=1 if model_type in ("roberta", "xlm-roberta", "camembert") else 3)
        if model_type == "electra":
            base["embedding_size"] = 16  # != hidden_size: embeddings_project
    base.update(kw)
    return cls(**base)


def batch(model_type: str, seed: int = 0, shape=(3, SEQLEN)) -> dict:
    """Mixed lengths (full, 1 token, about half), pad ids at padding; token types where the family has them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([shape[-1], 1, shape[-1] // 2 + 1] * (shape[0] // 3 + 1))[: shape[0]]
    mask = (torch.arange(shape[-1])[None, :] < lengths[:, None]).long()
    ids = torch.randint(PAD + 1, VOCAB, shape, generator=g)
    out = dict(input_ids=torch.where(mask.bool(), ids, PAD), attention_mask=mask)
    if model_type == "bert" or model_type == "electra":
        out["token_type_ids"] = torch.randint(0, 3, shape, generator=g) * mask
    return out


def labels_for(head: str, model_type: str, inputs: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = inputs["attention_mask"].bool()
    batch_size = inputs["input_ids"].shape[0]
    if head == "ForMaskedLM" or (head == "ForPreTraining" and model_type == "bert"):
        pick = (torch.rand(mask.shape, generator=g) < 0.4) & mask
        pick[0, 1] = True
        out = dict(labels=torch.where(pick, torch.randint(0, VOCAB, mask.shape, generator=g), -100))
        if head == "ForPreTraining":
            out["next_sentence_label"] = torch.randint(0, 2, (batch_size,), generator=g)
        return out
    if head == "ForPreTraining":  # ELECTRA: replaced-token labels
        return dict(labels=torch.randint(0, 2, mask.shape, generator=g))
    if head == "ForNextSentencePrediction":
        return dict(labels=torch.randint(0, 2, (batch_size,), generator=g))
    if head == "ForSequenceClassification":
        return dict(labels=torch.randint(0, 3, (batch_size,), generator=g))
    if head == "ForTokenClassification":
        return dict(labels=torch.where(mask, torch.randint(0, 3, mask.shape, generator=g), -100))
    if head == "ForQuestionAnswering":
        return dict(start_positions=torch.randint(0, 3, (batch_size,), generator=g),
                    end_positions=torch.randint(0, 3, (batch_size,), generator=g))
    if head == "ForMultipleChoice":
        return dict(labels=torch.randint(0, 2, (batch_size,), generator=g))
    return {}


def head_inputs(head: str, model_type: str, seed: int = 0) -> dict:
    """Inputs for ``head`` (multiple choice: ``(batch, 2 choices, seqlen)``)."""
    if head == "ForMultipleChoice":
        flat = batch(model_type, seed, shape=(4, SEQLEN))
        return {k: v.view(2, 2, SEQLEN) for k, v in flat.items()}
    return batch(model_type, seed)


def assert_outputs_match(ours, theirs, attention_mask, atol=1e-4, skip=()):
    """Every tensor field of transformers' output: at real tokens for per-token fields (leading
    dims = the mask's), else all of it."""
    real = attention_mask.bool()
    checked = 0
    for key, want in theirs.items():
        if key in skip or not isinstance(want, torch.Tensor):
            continue
        got = ours[key]
        assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        g, w = got.detach(), want.detach()
        if g.shape[: real.dim()] == real.shape:
            g, w = g[real], w[real]
        diff = (g - w).abs().max().item() if g.numel() else 0.0
        assert diff <= atol, f"{key}: max abs diff {diff:.2e} > {atol}"
        checked += 1
    assert checked, "no tensor compared"
