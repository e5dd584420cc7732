"""fastbert's ModernBERT vs transformers' on a random-weight checkpoint saved by transformers:
base model and each head, unpadded and padded, mixed lengths longer than the local window (global
and sliding-window layers), right and left padding, real tokens, fp32, <= 1e-4, outputs and
gradients; checkpoint keys both ways; the Auto classes."""

from __future__ import annotations

import pytest
import torch
from _tiny_modernbert import HEADS, LENGTHS, SEQLEN, TOL, batch, save_checkpoint, tiny_config

transformers = pytest.importorskip("transformers")

import fastbert.models as fm  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{(head, biases): path}`` of random-weight checkpoints written by transformers."""
    out = {}
    for biases in (False, True):
        for head in HEADS:
            torch.manual_seed(hash((head, biases)) % 1000)
            out[head, biases] = save_checkpoint(tmp_path_factory, head, biases)
    return out


def load_pair(path, cls, **fb_kw):
    hf = getattr(transformers, cls).from_pretrained(path, attn_implementation="eager").eval()
    fb = getattr(fm, cls).from_pretrained(path, **fb_kw).eval()
    return hf, fb


def per_token(name):
    return name in ("last_hidden_state", "logits_tok", "logits_mlm")


def compare_grads(hf, fb):
    hg = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    fg = {n: p.grad for n, p in fb.named_parameters() if p.grad is not None}
    assert set(hg) == set(fg) and hg
    for n in hg:
        torch.testing.assert_close(fg[n], hg[n], **TOL, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("biases", [False, True])
def test_base_model_matches_transformers(checkpoints, unpad, biases):
    hf, fb = load_pair(checkpoints["model", biases], "ModernBertModel", unpad=unpad)
    ids, mask = batch()
    real = mask.bool()
    h = hf(ids, attention_mask=mask, output_hidden_states=True)
    f = fb(ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(f.last_hidden_state[real], h.last_hidden_state[real], **TOL)
    if unpad:
        assert torch.equal(f.last_hidden_state[~real], torch.zeros_like(f.last_hidden_state[~real]))
    assert len(f.hidden_states) == len(h.hidden_states) == 5
    for a, b in zip(f.hidden_states, h.hidden_states):
        torch.testing.assert_close(a[real], b[real], **TOL)
    w = torch.randn_like(h.last_hidden_state)
    (h.last_hidden_state[real] * w[real]).sum().backward()
    (f.last_hidden_state[real] * w[real]).sum().backward()
    compare_grads(hf, fb)


def test_left_padding_and_position_ids(checkpoints):
    """Positions restart per packed sequence (transformers numbers padded columns): rotary depends
    on differences only, so left padding agrees; explicit position_ids are used as given."""
    hf, fb = load_pair(checkpoints["model", False], "ModernBertModel")
    ids, mask = batch(left=True)
    real = mask.bool()
    torch.testing.assert_close(fb(ids, attention_mask=mask).last_hidden_state[real],
                               hf(ids, attention_mask=mask).last_hidden_state[real], **TOL)
    pos = torch.arange(SEQLEN).flip(0)[None].expand(len(LENGTHS), SEQLEN) * 2
    ids, mask = batch()
    real = mask.bool()
    for unpad in (True, False):
        fb.unpad = unpad
        torch.testing.assert_close(fb(ids, attention_mask=mask, position_ids=pos).last_hidden_state[real],
                                   hf(ids, attention_mask=mask, position_ids=pos).last_hidden_state[real], **TOL)


def test_local_layers_use_the_window(checkpoints, monkeypatch):
    """The sequences are longer than the window: without it the outputs would differ."""
    _, fb = load_pair(checkpoints["model", False], "ModernBertModel")
    ids, mask = batch()
    real = mask.bool()
    windowed = fb(ids, attention_mask=mask).last_hidden_state
    assert [layer.attn.window for layer in fb.layers] == [None, (4, 4), (4, 4), None]
    for layer in fb.layers:
        monkeypatch.setattr(layer.attn, "window", None)
    assert (fb(ids, attention_mask=mask).last_hidden_state - windowed)[real].abs().max() > 1e-3


@pytest.mark.parametrize("head", ["mlm", "seq", "seq_mean", "tok"])
@pytest.mark.parametrize("biases", [False, True])
def test_heads_match_transformers(checkpoints, head, biases):
    cls = HEADS[head][0]
    hf, fb = load_pair(checkpoints[head, biases], cls)
    ids, mask = batch()
    real = mask.bool()
    g = torch.Generator().manual_seed(3)
    if head == "mlm":
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100).masked_fill(~real, -100)
        labels[0, 0] = ids[0, 0]
    elif head == "tok":
        labels = torch.randint(0, 3, ids.shape, generator=g).masked_fill(~real, -100)
    else:
        labels = torch.randint(0, 3, (len(LENGTHS),), generator=g)
    h = hf(ids, attention_mask=mask, labels=labels)
    f = fb(ids, attention_mask=mask, labels=labels)
    if head in ("mlm", "tok"):
        torch.testing.assert_close(f.logits[real], h.logits[real], **TOL)
    else:
        torch.testing.assert_close(f.logits, h.logits, **TOL)
    torch.testing.assert_close(f.loss, h.loss, **TOL)
    h.loss.backward()
    f.loss.backward()
    compare_grads(hf, fb)


def test_sparse_prediction_and_padded_mlm(checkpoints):
    hf, fb = load_pair(checkpoints["mlm", False], "ModernBertForMaskedLM", sparse_prediction=True, unpad=False)
    ids, mask = batch()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[2, 8] = 5, 6
    f = fb(ids, attention_mask=mask, labels=labels)
    h = hf(ids, attention_mask=mask, labels=labels)
    assert f.logits.shape == (2, 97)
    torch.testing.assert_close(f.logits, h.logits[labels != -100], **TOL)
    torch.testing.assert_close(f.loss, h.loss, **TOL)


def test_checkpoint_keys_both_ways_and_auto_classes(checkpoints, tmp_path):
    path = checkpoints["mlm", True]
    hf = transformers.ModernBertForMaskedLM.from_pretrained(path)
    fb = fm.AutoModelForMaskedLM.from_pretrained(path)
    assert type(fb) is fm.ModernBertForMaskedLM
    assert set(fb.state_dict()) == set(hf.state_dict())
    assert fb.decoder.weight is fb.model.embeddings.tok_embeddings.weight  # tied
    assert type(fm.AutoModel.from_pretrained(checkpoints["model", False])) is fm.ModernBertModel
    assert type(fm.AutoModelForTokenClassification.from_pretrained(checkpoints["tok", False])) is \
        fm.ModernBertForTokenClassification
    with pytest.raises(ValueError, match="has no such head"):
        fm.AutoModelForQuestionAnswering.from_pretrained(path)
    fb.save_pretrained(tmp_path)  # saved by fastbert, loaded by transformers: the same outputs
    back = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = batch()
    real = mask.bool()
    torch.testing.assert_close(fb.eval()(ids, attention_mask=mask).logits[real],
                               back(ids, attention_mask=mask).logits[real], **TOL)


def test_bad_config_and_inputs_raise():
    with pytest.raises(NotImplementedError, match="rope_type 'default'"):
        fm.ModernBertModel(tiny_config(rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    model = fm.ModernBertModel(tiny_config())
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(2 or 1, 5\)"):
        model(torch.ones(2, 5, dtype=torch.long), position_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids, inputs_embeds: expected exactly one"):
        model()


@pytest.mark.parametrize("unpad", [True, False])
def test_output_attentions_match_eager(checkpoints, unpad):
    """Attention probabilities (windowed on local layers) at real query rows."""
    hf, fb = load_pair(checkpoints["model", False], "ModernBertModel", unpad=unpad)
    ids, mask = batch()
    real = mask.bool()
    h = hf(ids, attention_mask=mask, output_attentions=True).attentions
    f = fb(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(f) == len(h) == 4
    for a, b in zip(f, h):
        for i, n in enumerate(LENGTHS):
            torch.testing.assert_close(a[i, :, :n], b[i, :, :n], **TOL)
        assert (a.masked_select((~real)[:, None, None, :].expand_as(a)) == 0).all()  # padding keys get 0


def test_gradient_checkpointing_same_gradients(checkpoints):
    _, fb = load_pair(checkpoints["model", True], "ModernBertModel")
    ids, mask = batch()
    fb.train()
    grads = []
    for enable in (False, True):
        fb.zero_grad()
        if enable:
            fb.gradient_checkpointing_enable()
            assert fb.encoder.gradient_checkpointing
        fb(ids, attention_mask=mask).last_hidden_state.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in fb.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-6)
