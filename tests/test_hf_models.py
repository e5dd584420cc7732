"""fastbert's transformers models, per family x head: a random-weight checkpoint saved by
transformers loads in fastbert and matches transformers (outputs and loss, real tokens, fp32,
<= 1e-4), unpadded and padded; fastbert saves and transformers loads it strictly. The default run
covers BERT with every head and one head per other family; ``-m slow`` the full matrix."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as fm  # noqa: E402
from _hf_cases import (DEFAULT_HEADS, FAMILIES, assert_outputs_match, head_inputs, labels_for,  # noqa: E402
                       tiny_config)


def _cases():
    for model_type, (_, prefix, heads) in FAMILIES.items():
        for head in heads:
            default = model_type == "bert" or DEFAULT_HEADS[model_type] == head
            yield pytest.param(model_type, head, id=f"{prefix}{head}",
                               marks=() if default else pytest.mark.slow)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(model_type, head) -> directory`` of a transformers-saved random checkpoint (built lazily)."""
    root, made = tmp_path_factory.mktemp("hf"), {}

    def get(model_type, head):
        if (model_type, head) not in made:
            torch.manual_seed(len(made))
            name = FAMILIES[model_type][1] + head
            num_labels = 2 if head == "ForQuestionAnswering" else 3
            model = getattr(transformers, name)(tiny_config(transformers, model_type, num_labels=num_labels))
            with torch.no_grad():  # random, not zero, head biases / padding rows
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            path = root / name
            model.save_pretrained(path)
            made[model_type, head] = path
        return made[model_type, head]

    return get


def _run(model, inputs, labels):
    with torch.no_grad():
        return model(**inputs, **labels)


@pytest.mark.parametrize("model_type,head", list(_cases()))
def test_transformers_checkpoint_matches_transformers(checkpoints, model_type, head, tmp_path):
    path = checkpoints(model_type, head)
    name = FAMILIES[model_type][1] + head
    theirs = getattr(transformers, name).from_pretrained(path, attn_implementation="eager").eval()
    ours, info = getattr(fm, name).from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(ours).__name__ == name and not ours.training
    inputs = head_inputs(head, model_type)
    labels = labels_for(head, model_type, inputs)
    want = _run(theirs, inputs, labels)
    for unpad in (True, False):
        ours.unpad = unpad
        got = _run(ours.eval(), inputs, labels)
        # QA's loss is a softmax over every position: unpadded, the padding logits are 0 (heads.py).
        skip = ("loss",) if unpad and head == "ForQuestionAnswering" else ()
        assert_outputs_match(got, want, inputs["attention_mask"], skip=skip)
        if labels:
            assert got.loss is not None
    # fastbert saves -> transformers loads strictly, same outputs.
    ours.save_pretrained(tmp_path / "fb")
    again, info = getattr(transformers, name).from_pretrained(tmp_path / "fb", attn_implementation="eager",
                                                              output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_outputs_match(_run(again.eval(), inputs, labels), want, inputs["attention_mask"], atol=0)
