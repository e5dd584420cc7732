"""The BERT encoder end to end on the ``triton`` backend (LayerNorm with its add & norm fusion,
GELU with bias and attention all through the Triton kernels, counted; interpreted on CPU): the
output and the parameter gradients against the reference backend (STYLE.md's rule, 3x for a whole
encoder), unpadded (varlen attention) and padded (mask), dropout on, and the real checkpoint
against Hugging Face transformers."""

from __future__ import annotations


import pytest
from _minilm import minilm_checkpoint
import torch
from _tolerance import assert_close_to_ref

pytest.importorskip("triton")

from fastbert.models import BertConfig, BertModel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.1)
    return BertConfig(**(base | kw))


def _batch(batch=3, seqlen=13, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 2, seqlen // 2 + 1][:batch])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return {k: v.to(DEV) for k, v in dict(input_ids=ids * mask, attention_mask=mask,
                                          token_type_ids=torch.randint(0, 2, (batch, seqlen), generator=g)).items()}


def _run(base, cfg, dtype, backend, unpad, batch, train):
    model = BertModel(cfg, unpad=unpad, backend=backend)
    model.load_state_dict(base.state_dict())
    model = model.to(DEV, dtype).train(train)
    torch.manual_seed(21)  # the same dropout seeds for every run
    out = model(**batch)
    real = batch["attention_mask"].bool()
    hidden = out.last_hidden_state[real]
    dy = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEV, dtype)
    names = ["embeddings.LayerNorm.weight", "encoder.layer.0.attention.output.LayerNorm.bias",
             "encoder.layer.1.intermediate.dense.bias", "encoder.layer.1.output.LayerNorm.weight",
             "encoder.layer.0.attention.self.query.weight"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(hidden, [params[n] for n in names], dy)
    return {"last_hidden_state": hidden, **{"d " + n: g for n, g in zip(names, grads)}}


@pytest.mark.parametrize("dtype,unpad,train", [
    (torch.float32, True, False), (torch.bfloat16, False, False), (torch.float16, True, True)],
    ids=["fp32-unpadded", "bf16-padded", "fp16-unpadded-dropout"])
def test_encoder_on_triton_matches_reference(dtype, unpad, train, poison, monkeypatch):
    import fastbert.backends.triton.attention as tri_attention
    import fastbert.backends.triton.gelu as tri_gelu
    import fastbert.backends.triton.layer_norm as tri_layer_norm

    calls = {}
    for mod, names in ((tri_attention, ("attention_fwd", "attention_bwd")), (tri_gelu, ("gelu_fwd", "gelu_bwd")),
                       (tri_layer_norm, ("layer_norm_fwd", "layer_norm_bwd"))):
        for name in names:
            def counted(*a, _fn=getattr(mod, name), _name=name, **kw):
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*a, **kw)
            monkeypatch.setattr(mod, name, counted)
    cfg = _config(hidden_dropout_prob=0.1 if train else 0.0, attention_probs_dropout_prob=0.1 if train else 0.0)
    torch.manual_seed(3)
    base = BertModel(cfg)
    batch = _batch()
    got = _run(base, cfg, dtype, "triton", unpad, batch, train)
    layers = cfg.num_hidden_layers  # the Triton kernels really ran: per layer one attention, one
    #                                 GELU, two add & norms, plus the embeddings' LayerNorm
    assert calls == {"attention_fwd": layers, "attention_bwd": layers, "gelu_fwd": layers, "gelu_bwd": layers,
                     "layer_norm_fwd": 2 * layers + 1, "layer_norm_bwd": 2 * layers + 1}, calls
    hi = _run(base, cfg, torch.float64, "reference", unpad, batch, train)
    lo = _run(base, cfg, dtype, "reference", unpad, batch, train)
    for name in got:
        assert got[name].dtype == lo[name].dtype, name
        assert_close_to_ref(got[name].float().cpu(), hi[name].cpu(), lo[name].float().cpu(), factor=3.0, name=name)


def test_real_checkpoint_matches_transformers_on_triton():
    transformers = pytest.importorskip("transformers")
    path = minilm_checkpoint()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    inputs = tok(["A man is playing a guitar.", "Cats sleep a lot."], padding=True, return_tensors="pt")
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    model = BertModel.from_pretrained(path, backend="triton").eval()
    with torch.no_grad():
        ref = hf(**inputs).last_hidden_state
        out = model(**{k: v.to(DEV) for k, v in inputs.items()}).last_hidden_state.cpu()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
