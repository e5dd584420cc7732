"""``fastbert.patch()`` on transformers' own ModernBERT models: the model keeps its class, weights
and outputs (vs the same checkpoint unpatched, sdpa; fp32, real tokens, <= 1e-4), base model and
each head, forward and every parameter's gradient, on a random-weight checkpoint saved and loaded
by transformers, padded batches of mixed lengths longer than the local window (global and
sliding-window layers), right and left padding; the attention runs through fastbert's varlen
attention with the window per ``config.layer_types``, rotary and GeGLU through fastbert ops;
``unpatch`` restores the class forward."""

from __future__ import annotations

import pytest
import torch
from _tiny_modernbert import HEADS, LENGTHS, SEQLEN, TOL, batch, save_checkpoint, tiny_config

transformers = pytest.importorskip("transformers")

import fastbert.nn.modernbert as nn_modernbert  # noqa: E402
from fastbert.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(head, biases) -> path``: random-weight checkpoints written by transformers
    (norms and biases perturbed, so a missed weight or bias shows), made on first use."""
    made = {}

    def get(head: str, biases: bool = False):
        if (head, biases) not in made:
            torch.manual_seed(len(made) + 11)
            made[head, biases] = save_checkpoint(tmp_path_factory, head, biases)
        return made[head, biases]

    return get


def load_pair(path, head):
    cls = getattr(transformers, HEADS[head][0])
    ref = cls.from_pretrained(path, attn_implementation="sdpa").eval()
    model = patch(cls.from_pretrained(path, attn_implementation="sdpa")).eval()
    return ref, model


def output(out, mask):
    """The compared tensor: per-token outputs on real tokens only (fastbert writes zeros at padding)."""
    x = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    return x[mask.bool()] if x.dim() == 3 else x


def check_pair(ref, model, ids, mask, labels=None):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(output(out, mask), output(want, mask), **TOL)
    if labels is not None:
        torch.testing.assert_close(out.loss, want.loss, **TOL)
    loss_out = out.loss if labels is not None else output(out, mask).square().sum()
    loss_want = want.loss if labels is not None else output(want, mask).square().sum()
    loss_out.backward()
    loss_want.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(grads) and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(got[n], grads[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("left", [False, True])
def test_base_model_matches_transformers(checkpoint, left):
    ref, model = load_pair(checkpoint("model", biases=not left), "model")
    assert type(model) is transformers.ModernBertModel and is_patched(model)
    assert model.state_dict().keys() == ref.state_dict().keys()
    check_pair(ref, model, *batch(left))


@pytest.mark.parametrize("head", ["mlm", "seq_mean", "tok"])
def test_heads_match_transformers(checkpoint, head):
    ref, model = load_pair(checkpoint(head, biases=True), head)
    ids, mask = batch()
    labels = {"mlm": ids.masked_fill(mask == 0, -100), "seq_mean": torch.tensor([0, 2, 1, 2]),
              "tok": torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)}[head]
    check_pair(ref, model, ids, mask, labels)


def test_cls_pooling_matches_with_right_padding(checkpoint):
    """``classifier_pooling="cls"`` reads position 0: a real token with right padding."""
    ref, model = load_pair(checkpoint("seq"), "seq")
    check_pair(ref, model, *batch(), torch.tensor([0, 2, 1, 2]))


def test_attention_runs_unpadded_with_the_window(checkpoint, monkeypatch):
    """Every layer calls fastbert's varlen attention (cu_seqlens, max_seqlen), the local ones with
    ``window=(local_attention // 2,) * 2``; rotary and GeGLU run through fastbert ops."""
    calls = []
    for op in ("attention", "rotary", "geglu"):
        real = getattr(nn_modernbert, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            calls.append((_op, kwargs.get("window"), kwargs.get("cu_seqlens") is not None, kwargs.get("backend")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(nn_modernbert, op, spy)
    cls = transformers.ModernBertModel
    model = patch(cls.from_pretrained(checkpoint("model"), attn_implementation="sdpa"), backend="torch").eval()
    with torch.no_grad():
        model(*batch())
    attn = [c for c in calls if c[0] == "attention"]
    assert [w for _, w, _, _ in attn] == [None, (4, 4), (4, 4), None]  # layer_types: global, local, local, global
    assert all(backend == "torch" for *_, backend in calls)
    assert all(varlen for op, _, varlen, _ in calls if op != "geglu")
    assert sum(c[0] == "rotary" for c in calls) == 4 and sum(c[0] == "geglu" for c in calls) == 4


def test_unpatch_restores_and_position_ids(checkpoint):
    ref, model = load_pair(checkpoint("model"), "model")
    ids, mask = batch(left=True)
    pos = torch.arange(SEQLEN)[None].expand(len(LENGTHS), -1) + 3  # given positions: packed like the tokens
    with torch.no_grad():
        torch.testing.assert_close(output(model(ids, mask, position_ids=pos), mask),
                                   output(ref(ids, mask, position_ids=pos), mask), **TOL)
        unpatch(model)
        assert not is_patched(model) and "forward" not in model.__dict__
        assert "_fastbert_encoder" not in model.__dict__
        torch.testing.assert_close(model(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state,
                                   atol=0, rtol=0)


def test_hidden_states_and_no_padding(checkpoint):
    """``output_hidden_states`` through transformers' collector; a batch without padding runs as is."""
    ref, model = load_pair(checkpoint("model"), "model")
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
        want = ref(ids, mask, output_hidden_states=True)
        assert len(out.hidden_states) == len(want.hidden_states) == 5
        for h, w in zip(out.hidden_states, want.hidden_states):
            torch.testing.assert_close(h[mask.bool()], w[mask.bool()], **TOL)
        full = torch.ones_like(mask)
        torch.testing.assert_close(model(ids, full).last_hidden_state, ref(ids, full).last_hidden_state, **TOL)
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state, **TOL)


def test_training_dropout_runs_and_config_errors(checkpoint):
    """Training mode with dropout reaches fastbert's dropout (differs from eval, finite grads);
    a scaled RoPE type is a named error at patch time."""
    cls = transformers.ModernBertForMaskedLM
    model = patch(cls.from_pretrained(checkpoint("mlm"), attention_dropout=0.1, mlp_dropout=0.1))
    ids, mask = batch()
    model.train()
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)
    model.eval()
    with torch.no_grad():
        a, b = model(ids, mask).logits, model(ids, mask).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    bad = transformers.ModernBertModel(tiny_config(False))
    bad.config.rope_parameters["sliding_attention"]["rope_type"] = "linear"
    with pytest.raises(NotImplementedError, match="rope_type"):
        patch(bad)
    assert not is_patched(bad)


@pytest.mark.slow
@pytest.mark.parametrize("backend_compile", ["aot_eager", "inductor"])
def test_compile_matches_eager(checkpoint, backend_compile):
    """torch.compile of a patched ModernBERT (it runs padded with the window under compile) equals
    eager, forward and gradients."""
    ref, model = load_pair(checkpoint("model", biases=True), "model")
    ids, mask = batch()
    compiled = torch.compile(model, backend=backend_compile)
    out = compiled(ids, mask).last_hidden_state
    want = ref(ids, mask).last_hidden_state
    torch.testing.assert_close(out[mask.bool()], want[mask.bool()], **TOL)
    out[mask.bool()].sum().backward()
    want[mask.bool()].sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_bench_modernbert_row():
    """``fastbert bench patched --only modernbert``'s row at a tiny size (a smoke test, no timing claim)."""
    from fastbert.bench import patched as bench

    plan = bench.TimingPlan(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0)
    small = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, local_attention=8, vocab_size=97,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                 sep_token_id=2)
    rows = bench.bench_modernbert(plan, layers=2, batch=2, seqlen=24, fills=(0.5,), config=small)
    assert len(rows) == 1 and set(rows[0]["rows"]) == {"transformers sdpa", "patch()"}
    assert all(r["median_s"] > 0 for r in rows[0]["rows"].values()) and 0.3 < rows[0]["fill"] < 0.8
    assert "ModernBertModel inference" in "\n".join(bench.report_lines(dict(threads=2, rounds=1, time="now",
                                                                              results=rows)))
