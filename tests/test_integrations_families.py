"""patch() on every family x head (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT): the
patched model (fp32, unpadded encoder) vs unpatched transformers in fp64 and fp32 on a padded
batch of mixed lengths, real tokens only; outputs and the gradient of every parameter within 3x
transformers' own fp32 error (STYLE.md's whole-encoder rule). BERT's heads and one head per other
family run by default; the rest behind ``-m slow``."""

from __future__ import annotations

import copy

import pytest
import torch
from _tolerance import assert_close_to_ref

transformers = pytest.importorskip("transformers")
from _hf_cases import DEFAULT_HEADS, FAMILIES, head_inputs, tiny_config  # noqa: E402

from fastbert.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

NO_DROPOUT = {"distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0)}


def _cases():
    for model_type, (_, prefix, heads) in FAMILIES.items():
        for head in heads:
            default = model_type == "bert" or DEFAULT_HEADS[model_type] == head
            yield pytest.param(model_type, head, id=f"{prefix}{head}", marks=() if default else pytest.mark.slow)


def _build(model_type, head):
    kw = NO_DROPOUT.get(model_type, dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         classifier_dropout=0.0))
    if model_type == "electra":
        kw["summary_last_dropout"] = 0.0  # the models run in train mode: no dropout anywhere
    config = tiny_config(transformers, model_type, num_labels=2 if head == "ForQuestionAnswering" else 3, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[model_type][1] + head)(config)
    with torch.no_grad():  # random, not zero, biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def _outputs_and_grads(model, inputs):
    """Every tensor output (per-token ones at real tokens) and the gradient of a random-weighted sum of them."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    real = inputs["attention_mask"].bool()
    g = torch.Generator().manual_seed(5)
    tensors, loss = {}, 0.0
    for key, t in out.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.shape[: real.dim()] == real.shape:
            t = t[real]
        tensors[key] = t
        loss = loss + (t * torch.randn(t.shape, generator=g).to(t.dtype)).sum()
    loss.backward()
    return tensors, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type,head", list(_cases()))
def test_patch_family_head_matches_transformers(model_type, head):
    ref_lo = _build(model_type, head)
    ref_hi = copy.deepcopy(ref_lo).double()
    model = copy.deepcopy(ref_lo)
    keys = list(model.state_dict())
    patch(model)
    assert is_patched(model) and list(model.state_dict()) == keys
    shapes = []
    for block in model.base_model.__dict__.get("_modules")[
            "transformer" if model_type == "distilbert" else "encoder"].__dict__["_fastbert_encoder"].layer:
        block.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].dim()))
    inputs = head_inputs(head, model_type)
    got, g = _outputs_and_grads(model, inputs)
    assert shapes and set(shapes) == {2}, "every layer runs on packed (total_tokens, hidden)"
    lo, g_lo = _outputs_and_grads(ref_lo, inputs)
    hi, g_hi = _outputs_and_grads(ref_hi, inputs)
    assert got.keys() == hi.keys()
    for key in got:
        assert_close_to_ref(got[key], hi[key], lo[key], factor=3.0, name=key)
    floor_eps = 4.0 * float(inputs["attention_mask"].sum()) ** 0.5  # a parameter gradient sums over tokens
    for name in g_hi:
        if g_hi[name] is None:
            assert g[name] is None, name
            continue
        assert g[name] is not None, f"{name}: no gradient"
        assert_close_to_ref(g[name], g_hi[name], g_lo[name], factor=3.0, floor_eps=floor_eps, name=f"grad {name}")
    unpatch(model)
    assert not is_patched(model)
