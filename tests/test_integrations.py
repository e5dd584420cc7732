"""fastbert inside transformers: register() / attn_implementation="fastbert", patch() / unpatch().

Parity follows STYLE.md's rule for a whole encoder: the model under test in fp32 against the
unpatched transformers model in fp64, with a tolerance of 3x the unpatched model's own fp32 error.
Real-weights tests use the all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384) on a padded batch
of real sentences; small random models (2 layers, hidden 64) cover the rest.
"""

from __future__ import annotations

import pytest
import torch
from _minilm import minilm_checkpoint
from _tolerance import assert_close_to_ref

transformers = pytest.importorskip("transformers")
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertForPreTraining,  # noqa: E402
                          BertForSequenceClassification, BertModel)

from fastbert.integrations.transformers import (fastbert_mask, is_patched, patch,  # noqa: E402
                                                register, unpatch)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "A fused attention kernel never writes the full score matrix to memory, so long sequences fit.",
    "O rato roeu a roupa do rei de Roma.",
]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def batch():
    tok = AutoTokenizer.from_pretrained(minilm_checkpoint())
    b = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (b["attention_mask"] == 0).any(), "the batch must contain padding"
    return dict(b)


def _load(**kwargs):
    return BertModel.from_pretrained(minilm_checkpoint(), **NO_DROPOUT, **kwargs)


def _small_config(**kwargs) -> BertConfig:
    base = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, **NO_DROPOUT)
    base.update(kwargs)
    return BertConfig(**base)


def _twin_models():
    """``(ref, model)``: two eval BertModels of ``_small_config`` with the same random weights (seed 0)."""
    torch.manual_seed(0)
    ref = BertModel(_small_config()).eval()
    model = BertModel(_small_config()).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def _random_batch(batch=3, seqlen=11, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 5, 8][:batch])
    attention_mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _loss_and_grads(model, batch):
    """A loss that reaches every parameter: weighted real-token states + the pooler output."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    mask = batch["attention_mask"].bool()
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.last_hidden_state.shape, generator=g).to(out.last_hidden_state.dtype)
    loss = (out.last_hidden_state * w)[mask].sum() + out.pooler_output.pow(2).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


def _assert_model_parity(model, ref_lo, ref_hi, batch, *, grads=True):
    """``model`` (fp32) vs the unpatched model in fp64 (``ref_hi``) and fp32 (``ref_lo``):
    real-token outputs, pooler, and the gradient of every parameter."""
    mask = batch["attention_mask"].bool()
    results = [_loss_and_grads(m, batch) for m in (model, ref_lo, ref_hi)]
    (out, g), (lo, g_lo), (hi, g_hi) = results
    assert_close_to_ref(out.last_hidden_state[mask], hi.last_hidden_state[mask],
                        lo.last_hidden_state[mask], factor=3.0, name="last_hidden_state")
    assert_close_to_ref(out.pooler_output, hi.pooler_output, lo.pooler_output, factor=3.0, name="pooler_output")
    if not grads:
        return
    assert g.keys() == g_hi.keys()
    # A parameter gradient is a sum over every token of the batch: its rounding error grows like
    # sqrt(tokens), so the floor is 4 eps * sqrt(tokens) (PyTorch's own fp32 error on one
    # parameter can be luckily small; measured worst ratio to it 2.8, LayerNorm weights).
    floor_eps = 4.0 * float(mask.sum()) ** 0.5
    for name in g:
        assert g[name] is not None, f"{name}: no gradient"
        assert_close_to_ref(g[name], g_hi[name], g_lo[name], factor=3.0, floor_eps=floor_eps,
                            name=f"grad {name}")


@pytest.fixture(scope="module")
def minilm_refs():
    ref_lo = _load().train()
    ref_hi = _load().double().train()
    return ref_lo, ref_hi


def test_patch_matches_transformers_on_real_checkpoint(batch, minilm_refs):
    model = patch(_load()).train()
    assert is_patched(model)
    assert model.config._attn_implementation == "fastbert"
    assert "forward" in model.encoder.layer[0].output.__dict__
    assert "forward" in model.encoder.layer[0].intermediate.__dict__
    _assert_model_parity(model, *minilm_refs, batch)


def test_attn_implementation_fastbert_matches_transformers_on_real_checkpoint(batch, minilm_refs):
    register()
    model = _load(attn_implementation="fastbert").train()
    assert model.config._attn_implementation == "fastbert"
    _assert_model_parity(model, *minilm_refs, batch)


def test_mask_function_hands_over_padding_mask(batch):
    """Without the registered mask function transformers would pass no mask: padded keys would be
    attended and the real tokens' outputs would depend on what sits in the padding."""
    register()
    model = _load(attn_implementation="fastbert").eval()
    mask = batch["attention_mask"].bool()
    noisy = dict(batch)
    g = torch.Generator().manual_seed(3)
    noisy["input_ids"] = torch.where(mask, batch["input_ids"],
                                     torch.randint(1000, 2000, mask.shape, generator=g))
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = model(**noisy).last_hidden_state
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-5)

    m2d = mask.clone()
    out = fastbert_mask(batch_size=4, q_length=mask.shape[1], kv_length=mask.shape[1],
                        attention_mask=m2d)
    assert out.shape == mask.shape and torch.equal(out, m2d)


def test_output_attentions_returns_probabilities(batch):
    eager = _load(attn_implementation="eager").eval()
    model = patch(_load()).eval()
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
        out = model(**batch, output_attentions=True)
    assert len(out.attentions) == eager.config.num_hidden_layers
    mask = batch["attention_mask"].bool()
    for a, r in zip(out.attentions, ref.attentions):
        assert a.shape == (4, 12, mask.shape[1], mask.shape[1])
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
        assert (a[~mask[:, None, None, :].expand_as(a)] == 0).all(), "padded keys get probability 0"
        # Real query rows only: the unpadded encoder never computes padded rows.
        torch.testing.assert_close(a.transpose(1, 2)[mask], r.transpose(1, 2)[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state[mask], ref.last_hidden_state[mask], rtol=1e-4, atol=1e-4)


def _integrated_gradients(model, batch, steps=16):
    """Integrated gradients (Sundararajan et al. 2017, eq. 3, right Riemann sum) of the
    classifier's logit 1 w.r.t. the input embeddings of sentence 0, from a zero baseline; the
    ``steps`` interpolation points run as one batch."""
    ids = batch["input_ids"][:1]
    mask = batch["attention_mask"][:1]
    emb = model.get_input_embeddings()(ids).detach()
    alphas = torch.arange(1, steps + 1, dtype=emb.dtype).div(steps).view(-1, 1, 1)
    path = (alphas * emb).requires_grad_(True)
    logits = model(inputs_embeds=path, attention_mask=mask.expand(steps, -1)).logits
    logits[:, 1].sum().backward()
    return emb * path.grad.mean(0, keepdim=True), path.grad


def test_gradients_reach_inputs_embeds_for_attribution(batch):
    def load():
        torch.manual_seed(0)  # the classifier head is newly initialised
        return BertForSequenceClassification.from_pretrained(minilm_checkpoint(), num_labels=2, **NO_DROPOUT).eval()

    ref_lo, ref_hi = load(), load().double()
    ig, grad = _integrated_gradients(patch(load()), batch)
    assert grad is not None and grad.abs().sum() > 0
    ig_lo, _ = _integrated_gradients(ref_lo, batch)
    ig_hi, _ = _integrated_gradients(ref_hi, batch)
    assert_close_to_ref(ig, ig_hi, ig_lo, factor=3.0, name="integrated gradients")


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForMaskedLM, BertForPreTraining])
def test_patch_heads(cls):
    torch.manual_seed(0)
    config = _small_config()
    ref = cls(config).train()
    model = cls(config).train()
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    patch(model)
    assert list(model.state_dict()) == keys
    b = _random_batch()
    _assert_close_real(model(**b)[0], ref(**b)[0], b)


def _assert_close_real(out, want, b, **tol):
    """Per-token outputs on real tokens only (the unpadded encoder writes zeros at padding)."""
    if out.dim() >= 3:
        mask = b["attention_mask"].bool()
        out, want = out[mask], want[mask]
    torch.testing.assert_close(out, want, **(tol or dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_patch_bert_family(family):
    """Models with BERT's block layout (RoBERTa, ELECTRA) are rewired too: 3 blocks per layer."""
    kwargs = _small_config().to_dict()
    kwargs = {k: kwargs[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "hidden_dropout_prob",
                                     "attention_probs_dropout_prob")}
    if family == "roberta":
        config, cls = transformers.RobertaConfig(**kwargs), transformers.RobertaForSequenceClassification
    else:
        config, cls = transformers.ElectraConfig(embedding_size=64, **kwargs), transformers.ElectraForMaskedLM
    torch.manual_seed(0)
    ref = cls(config).train()
    model = cls(config).train()
    model.load_state_dict(ref.state_dict())
    patch(model)
    # 3 blocks per layer (the fallback for decoders) + the encoder's unpadded forward
    assert sum("forward" in m.__dict__ for m in model.modules()) == 3 * config.num_hidden_layers + 1
    assert model.config._attn_implementation == "fastbert"
    b = _random_batch()
    out, want = model(**b)[0], ref(**b)[0]
    _assert_close_real(out, want, b)
    real = b["attention_mask"].bool()
    (out[real] if out.dim() >= 3 else out).sum().backward()
    (want[real] if want.dim() >= 3 else want).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_patch_forces_backend(monkeypatch):
    """``patch(model, backend=...)`` reaches every fastbert op call (attention, add & norm, GELU)."""
    import fastbert.integrations._hf.attention as hf_integration  # the attention interface's module
    import fastbert.nn.bert as nn_bert

    seen = []
    for where, op in ((hf_integration, "attention"), (nn_bert, "attention"), (nn_bert, "layer_norm"),
                      (nn_bert, "gelu")):  # the unpadded encoder runs nn's blocks
        real = getattr(where, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            seen.append((_op, kwargs.get("backend")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(where, op, spy)
    ref, model = _twin_models()
    patch(model, backend="reference")
    b = _random_batch()
    with torch.no_grad():
        out = model(**b).last_hidden_state
        want = ref(**b).last_hidden_state
    assert {op for op, _ in seen} == {"attention", "layer_norm", "gelu"}
    assert all(backend == "reference" for _, backend in seen)
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(out[mask], want[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_act, approximate", [("gelu_new", "tanh"), ("gelu_python", "none"),
                                                     ("relu", None)])
def test_hidden_act_mapping(hidden_act, approximate):
    torch.manual_seed(0)
    ref = BertModel(_small_config(hidden_act=hidden_act)).train()
    model = BertModel(_small_config(hidden_act=hidden_act)).train()
    model.load_state_dict(ref.state_dict())
    patch(model)
    inter = model.encoder.layer[0].intermediate
    if approximate is None:
        assert "forward" not in inter.__dict__, "an activation fastbert lacks keeps HF's forward"
    else:
        assert inter._fastbert_approximate == approximate
    b = _random_batch()
    out, grads = _loss_and_grads(model, b)
    ref_out, ref_grads = _loss_and_grads(ref, b)
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[mask], ref_out.last_hidden_state[mask], rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_decoder_causal_and_cross_attention_match_sdpa():
    """Non-bidirectional masks (a causal decoder) reach the attention as a 4-D mask; cross-attention
    gets the encoder's 2-D padding mask."""
    torch.manual_seed(0)
    config = _small_config(is_decoder=True, add_cross_attention=True)
    ref = BertModel(config).eval()
    model = BertModel(config).eval()
    model.load_state_dict(ref.state_dict())
    patch(model)
    b = _random_batch()
    enc = torch.randn(3, 6, 64)
    enc_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        out = model(**b, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=False)
        want = ref(**b, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=False)
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[mask], want.last_hidden_state[mask], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_replays_dropout():
    """With dropout on, a checkpointed patched model recomputes the same fastbert dropout masks
    (seeds come from torch's RNG, which checkpointing restores): same loss, same gradients."""
    config = _small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = patch(BertModel(config)).train()
    b = _random_batch()
    torch.manual_seed(1)
    _, want = _loss_and_grads(model, b)
    want = {n: g.clone() for n, g in want.items()}
    model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
    assert model.is_activation_checkpointing
    torch.manual_seed(1)
    _, got = _loss_and_grads(model, b)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_save_pretrained_loads_in_plain_transformers(tmp_path):
    torch.manual_seed(0)
    model = patch(BertForSequenceClassification(_small_config(num_labels=3))).eval()
    model.save_pretrained(tmp_path)
    assert "fastbert" not in (tmp_path / "config.json").read_text()
    plain = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config._attn_implementation == "sdpa"
    assert not is_patched(plain)
    assert plain.state_dict().keys() == model.state_dict().keys()
    b = _random_batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(**b).logits, model(**b).logits, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_original_forwards():
    ref, model = _twin_models()
    assert patch(model) is model and patch(model) is model  # idempotent
    assert unpatch(model) is model
    assert not is_patched(model)
    assert model.config._attn_implementation == ref.config._attn_implementation == "sdpa"
    for m in model.modules():
        assert not any(a in m.__dict__ for a in ("forward", "_fastbert_backend", "_fastbert_approximate",
                                                 "_fastbert_encoder"))
    b = _random_batch()
    with torch.no_grad():
        assert torch.equal(model(**b).last_hidden_state, ref(**b).last_hidden_state)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model: expected a BERT-family model"):
        patch(gpt2)


def test_causal_call_without_mask_is_refused():
    from fastbert.integrations.transformers import fastbert_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention_mask: a causal attention call needs a mask"):
        fastbert_attention_forward(module, q, q, q, None)
    module.is_causal = False
    out, probs = fastbert_attention_forward(module, q, q, q, None)
    assert out.shape == (1, 5, 2, 8) and probs is None


# ---- the unpadded encoder of patch() ----


def _layer_inputs(model):
    """Record the shape each fastbert block of the patched encoder receives."""
    shapes = []
    for block in model.base_model.encoder.__dict__["_fastbert_encoder"].layer:
        block.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_patch_runs_the_encoder_unpadded(batch):
    """Every layer runs on the packed real tokens ``(total_tokens, hidden)``; a batch without
    padding skips the pack / unpack and runs ``(batch, seqlen, hidden)``."""
    model = patch(_load()).eval()
    shapes = _layer_inputs(model)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        model(**batch)
    assert shapes == [(int(mask.sum()), 384)] * 6
    shapes.clear()
    full = {k: v[:, :5] for k, v in batch.items()}  # every sentence has >= 5 real tokens
    with torch.no_grad():
        model(**full)
    assert shapes == [(4, 5, 384)] * 6


def test_patch_hidden_states_and_attentions_from_call_and_config(batch):
    """``output_hidden_states`` / ``output_attentions`` in the call or in the config (the config
    setting used to be dropped after patch()); real tokens compared."""
    eager = _load(attn_implementation="eager", output_attentions=True, output_hidden_states=True).eval()
    model = patch(_load(attn_implementation="eager", output_attentions=True, output_hidden_states=True)).eval()
    plain = patch(_load()).eval()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = eager(**batch)
        outs = [model(**batch), plain(**batch, output_attentions=True, output_hidden_states=True)]
    for out in outs:
        assert len(out.hidden_states) == 7 and len(out.attentions) == 6
        for h, r in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(h[mask], r[mask], rtol=1e-4, atol=1e-4)
        for a, r in zip(out.attentions, ref.attentions):
            torch.testing.assert_close(a.transpose(1, 2)[mask], r.transpose(1, 2)[mask], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert plain(**batch).attentions is None


def test_patch_gradient_checkpointing_unpadded():
    """Checkpointing reaches the unpadded encoder's blocks: same loss and gradients as without."""
    torch.manual_seed(0)
    model = patch(BertModel(_small_config())).train()
    b = _random_batch()
    _, want = _loss_and_grads(model, b)
    want = {n: g.clone() for n, g in want.items()}
    model.activation_checkpointing_enable()
    calls = []
    enc = model.encoder.__dict__["_fastbert_encoder"]
    for block in enc.layer:
        block.register_forward_pre_hook(lambda *a: calls.append(1))  # recompute stops early, before post-hooks
    _, got = _loss_and_grads(model, b)
    assert len(calls) == 2 * 2, "each block runs forward, then again in backward"
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend, fused", [("torch", False), ("reference", True)])
def test_dense_bias_fusion_follows_the_backend_capability(monkeypatch, backend, fused):
    """The torch backend keeps the dense bias in the GEMM (addmm); a backend declaring
    ``fuses_dense_bias`` receives it in layer_norm(x_bias=) / gelu(bias=). Same outputs either way."""
    import fastbert.nn.bert as nn_bert
    from fastbert.ops import fuses_dense_bias

    assert fuses_dense_bias(torch.zeros(1), backend) is fused
    seen = []
    for op, key in (("layer_norm", "x_bias"), ("gelu", "bias")):
        real = getattr(nn_bert, op)

        def spy(*args, _real=real, _key=key, **kwargs):
            seen.append(kwargs.get(_key) is not None)
            return _real(*args, **kwargs)

        monkeypatch.setattr(nn_bert, op, spy)
    ref, model = _twin_models()
    patch(model, backend=backend)
    b = _random_batch()
    with torch.no_grad():
        out, want = model(**b).last_hidden_state, ref(**b).last_hidden_state
    assert seen and set(seen) == {fused}
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(out[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_trainer_fine_tunes_patched_model_and_save_model_reloads_in_plain_transformers(tmp_path):
    """transformers.Trainer trains a patched classifier (padded batches of mixed lengths); the saved
    model loads in plain transformers with equal predictions."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = patch(BertForSequenceClassification(_small_config(num_labels=2)))
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(16):
        n = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, 120, (11,), generator=g)
        mask = (torch.arange(11) < n).long()
        rows.append(dict(input_ids=ids * mask, attention_mask=mask, labels=torch.tensor(i % 2)))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    trainer.save_model(str(tmp_path / "saved"))
    plain = BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert not is_patched(plain)
    b = _random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**b).logits, plain(**b).logits, rtol=1e-5, atol=1e-5)
