"""The token-classification and question-answering heads, built once in
:mod:`fastbert.models.heads` for every family: the same modules, names and dropout
probabilities as transformers' own classes (a family changes only the dropout)."""

from __future__ import annotations

import pytest
import torch

from _hf_cases import FAMILIES, tiny_config

transformers = pytest.importorskip("transformers")
import fastbert.models as models  # noqa: E402


def _head_modules(model, prefix: str) -> list:
    """``(name, type, dropout p, weight shape)`` of the modules outside the encoder."""
    out = []
    for name, m in model.named_modules():
        if not name or name.split(".")[0] == prefix or list(m.children()):
            continue
        out.append((name, "Dropout" if isinstance(m, torch.nn.Dropout) else "Linear",
                    getattr(m, "p", None), tuple(getattr(m, "weight", torch.empty(0)).shape)))
    return out


@pytest.mark.parametrize("head", ["ForTokenClassification", "ForQuestionAnswering"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "distilbert"])
def test_head_matches_transformers(model_type, head):
    # distinct dropouts, so a head that reads the wrong field shows
    kw = (dict(dropout=0.11, qa_dropout=0.22, seq_classif_dropout=0.33) if model_type == "distilbert" else
          dict(hidden_dropout_prob=0.11, classifier_dropout=None))
    config = tiny_config(transformers, model_type, num_labels=2, **kw)
    name = FAMILIES[model_type][1] + head
    theirs = getattr(transformers, name)(config)
    ours = getattr(models, name)(config)
    prefix = ours.base_model_prefix
    assert _head_modules(ours, prefix) == _head_modules(theirs, prefix)
    assert [k for k in ours.state_dict() if not k.startswith(prefix)] == [
        k for k in theirs.state_dict() if not k.startswith(prefix)]
    if model_type != "distilbert":  # classifier_dropout wins over hidden_dropout_prob
        config.classifier_dropout = 0.44
        drops = {m.p for m in getattr(models, name)(config).modules()
                 if isinstance(m, torch.nn.Dropout)} - {0.11}
        assert drops == ({0.44} if head == "ForTokenClassification" else set())


def test_distilbert_qa_still_checks_num_labels():
    config = tiny_config(transformers, "distilbert", num_labels=3)
    with pytest.raises(ValueError, match="num_labels: DistilBertForQuestionAnswering expects 2, got 3"):
        models.DistilBertForQuestionAnswering(config)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "modernbert"])
def test_base_model_tuple_output_is_the_dict_fields(model_type):
    """``base_output``: return_dict=False gives the non-None fields of the dict output, in order."""
    if model_type == "modernbert":
        from _tiny_modernbert import tiny_config as modernbert_config

        config, cls = modernbert_config(), models.ModernBertModel
    else:
        config = tiny_config(transformers, model_type)
        cls = getattr(models, FAMILIES[model_type][1] + "Model")
    model = cls(config).eval()
    ids = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        d = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        t = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
    fields = [v for v in d.values() if v is not None]
    assert isinstance(t, tuple) and len(t) == len(fields) == (3 if model_type == "bert" else 2)  # + pooler_output
    torch.testing.assert_close(t[0], d.last_hidden_state)
    assert len(t[-1]) == config.num_hidden_layers + 1
