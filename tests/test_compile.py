"""fastbert's BertModel under torch.compile(fullgraph=True) and CPU bf16 autocast.

``fullgraph=True`` turns any graph break into an error, so a passing compile means one graph.
Compiles on CPU are slow (inductor builds C++): the default run compiles one tiny model per mode
with inductor and checks the autograd graphs with ``aot_eager``; inductor training variants are
marked slow.
"""

from __future__ import annotations

import pytest
import torch
from _minilm import minilm_checkpoint
from _tolerance import assert_close_to_ref

from fastbert.models import BertConfig, BertModel
from fastbert.nn.padding import unpad_metadata


def _tiny(dropout=0.0, unpad=False, seed=0):
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return BertModel(config, unpad=unpad)


def _batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (3, 12), generator=g)
    attention_mask = (torch.arange(12)[None] < torch.tensor([[12], [7], [9]])).long()
    token_type_ids = (torch.arange(12)[None] >= 5).long() * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def _run(model, batch, *, train, seed=1, **kwargs):
    """Forward (and backward of a loss on real tokens when ``train``) under a fixed RNG seed."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch, **kwargs)
    grads = {}
    if train:
        mask = batch["attention_mask"].bool()
        w = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(2))
        ((out.last_hidden_state * w)[mask].sum() + out.pooler_output.sum()).backward()
        module = getattr(model, "_orig_mod", model)  # a compiled wrapper prefixes the names
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(out, ref, grads, ref_grads, mask, tol=1e-5):
    torch.testing.assert_close(out.last_hidden_state[mask], ref.last_hidden_state[mask], rtol=tol, atol=tol)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


def test_compile_padded_fullgraph_inductor():
    """Padded mode: no host sync, no data-dependent shape -> one graph; inductor's output equals eager."""
    torch._dynamo.reset()
    model, batch = _tiny(), _batch()
    ref, _ = _run(model, batch, train=False)
    out, _ = _run(torch.compile(model, fullgraph=True), batch, train=False)
    _assert_same(out, ref, {}, {}, batch["attention_mask"].bool())


def test_compile_unpadded_with_precomputed_cu_seqlens_inductor():
    """Unpadded mode: unpad_metadata (a host sync, data-dependent shapes) runs outside; the compiled
    model takes indices / cu_seqlens / max_seqlen and is one graph."""
    torch._dynamo.reset()
    model, batch = _tiny(unpad=True), _batch()
    indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])
    meta = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    ref, _ = _run(model, batch, train=False)
    out, _ = _run(torch.compile(model, fullgraph=True), batch, train=False, **meta)
    _assert_same(out, ref, {}, {}, batch["attention_mask"].bool())


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_compile_training_with_dropout_aot_eager(unpad):
    """Forward + backward with dropout on through AOTAutograd (fake tensors for every fastbert op
    direction, the dropout seed drawn from torch's RNG inside the graph): same outputs and
    gradients as eager under the same seed."""
    torch._dynamo.reset()
    model, batch = _tiny(dropout=0.1, unpad=unpad), _batch()
    meta = {}
    if unpad:
        indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])
        meta = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    ref, ref_grads = _run(model, batch, train=True)
    out, grads = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), batch, train=True, **meta)
    _assert_same(out, ref, grads, ref_grads, batch["attention_mask"].bool())
    no_dropout, _ = _run(model, batch, train=False)
    assert not torch.allclose(ref.last_hidden_state, no_dropout.last_hidden_state), "dropout was on"


@pytest.mark.slow
@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_compile_training_inductor(unpad):
    torch._dynamo.reset()
    model, batch = _tiny(unpad=unpad), _batch()
    meta = {}
    if unpad:
        indices, cu_seqlens, max_seqlen = unpad_metadata(batch["attention_mask"])
        meta = dict(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    ref, ref_grads = _run(model, batch, train=True)
    out, grads = _run(torch.compile(model, fullgraph=True), batch, train=True, **meta)
    _assert_same(out, ref, grads, ref_grads, batch["attention_mask"].bool(), tol=1e-4)


@pytest.fixture(scope="module")
def real_batch():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_checkpoint())
    sentences = ["The quick brown fox jumps over the lazy dog.", "Attention is all you need.",
                 "A fused kernel never writes the full score matrix to memory.",
                 "O rato roeu a roupa do rei de Roma."]
    return dict(tok(sentences, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("impl", ["fastbert-padded", "fastbert-unpadded", "patched-transformers"])
def test_autocast_bf16_matches_within_bf16_error(real_batch, impl):
    """MiniLM weights under CPU bf16 autocast vs transformers in fp32.

    Under autocast fastbert's LayerNorm returns x's dtype (as fused kernels do), so the residual
    stream is bf16: the low-precision reference is transformers' encoder run in bf16 (measured:
    fastbert 0.041 max abs error, transformers in bf16 0.042, transformers under autocast, whose
    LayerNorm returns fp32, 0.014). Tolerance: 3x that error (STYLE.md, whole encoder).
    """
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(minilm_checkpoint()).eval()
    hf_bf16 = transformers.BertModel.from_pretrained(minilm_checkpoint()).eval().to(torch.bfloat16)
    if impl == "patched-transformers":
        from fastbert.integrations.transformers import patch

        model = patch(transformers.BertModel.from_pretrained(minilm_checkpoint())).eval()
    else:
        model = BertModel.from_pretrained(minilm_checkpoint(), unpad=impl == "fastbert-unpadded").eval()
    mask = real_batch["attention_mask"].bool()
    with torch.no_grad():
        hi = hf(**real_batch)
        lo = hf_bf16(**real_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**real_batch)
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert_close_to_ref(out.last_hidden_state[mask].float(), hi.last_hidden_state[mask],
                        lo.last_hidden_state[mask].float(), factor=3.0, name="last_hidden_state")
    assert_close_to_ref(out.pooler_output.float(), hi.pooler_output, lo.pooler_output.float(),
                        factor=3.0, name="pooler_output")


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_autocast_bf16_backward_runs(unpad):
    """Training step under autocast, dropout on: finite fp32 gradients for every parameter."""
    model = _tiny(dropout=0.1, unpad=unpad).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch())
        loss = out.last_hidden_state.float().pow(2).mean() + out.pooler_output.float().sum()
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
