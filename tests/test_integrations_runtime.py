"""A patched transformers model under the runtime features users combine it with: CPU bf16
autocast (training step) and torch.compile (the patched encoder runs padded inside a compiled
region, since packing has data-dependent shapes). DDP through a patched model is in
tests/test_ddp.py; bf16 autocast forward parity on MiniLM in tests/test_compile.py."""

from __future__ import annotations

import copy

import pytest
import torch
from _tolerance import assert_close_to_ref

transformers = pytest.importorskip("transformers")
from _hf_cases import tiny_config  # noqa: E402

from fastbert.integrations.transformers import patch  # noqa: E402


def _pair(cls_name="BertForSequenceClassification", **kw):
    config = tiny_config(transformers, "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    torch.manual_seed(0)
    plain = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # random, not zero, biases
    patched = getattr(transformers, cls_name)(tiny_config(transformers, "bert", hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0, **kw))
    patched.load_state_dict(plain.state_dict())
    return plain, patch(patched)


def _batch(batch=3, seqlen=12, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seqlen, 5, 9][:batch])
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seqlen), generator=g) * mask
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1][:batch]))


def test_autocast_bf16_training_step_through_patched_model():
    """Loss and every parameter's gradient under CPU bf16 autocast: finite, fp32 (the parameters'
    dtype), and within 3x the bf16 error of transformers (the unpatched model run in bf16: under
    autocast fastbert's LayerNorm returns bf16, so the residual stream is bf16, see
    tests/test_compile.py) against the unpatched model in fp32."""
    plain, patched = _pair()
    plain_bf16 = copy.deepcopy(plain).to(torch.bfloat16)
    batch = _batch()

    def grads(m, autocast):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    hi, lo, got = grads(plain, False), grads(plain_bf16, False), grads(patched, True)
    assert got.keys() == hi.keys()
    for name, g in got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert_close_to_ref(g, hi[name], lo[name].float(), factor=3.0, name=name)


@pytest.mark.slow  # dynamo traces all of transformers' BERT: ~1 min on the shared 2-core machine
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_through_patched_model(backend):
    """torch.compile of a patched model equals the eager patched model (forward and gradients)."""
    _, patched = _pair("BertModel")
    batch = _batch()
    batch.pop("labels")
    mask = batch["attention_mask"].bool()
    compiled = torch.compile(patched, backend=backend)
    outs = []
    for m in (patched, compiled):
        res = m(**batch)
        out = res.last_hidden_state
        ((out[mask] ** 2).sum() + res.pooler_output.sum()).backward()
        outs.append((out[mask].detach(), {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}))
        patched.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], rtol=1e-3, atol=1e-5, msg=name)
