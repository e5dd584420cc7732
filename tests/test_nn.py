"""fastbert.nn: LayerNorm/GELU drop-ins against torch.nn, swap_modules, BERT blocks against transformers."""

import pytest
import torch
from torch import nn

import fastbert.nn as fnn
from _tolerance import assert_close_to_ref

BACKENDS = ["reference", "torch"]


def _run(module, x):
    """Output and gradients (input, then parameters) of sum(out * fixed random weights)."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(out.dtype)
    (out * w).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    return out, grads


def _check_against_torch(fb_module, torch_module, x):
    """fastbert in x's dtype vs torch in fp64 (truth) and torch in x's dtype (PyTorch's own error)."""
    out, grads = _run(fb_module, x)
    lo_out, lo_grads = _run(torch_module, x)
    hi_out, hi_grads = _run(torch_module.double(), x.double())
    torch_module.to(x.dtype)
    assert_close_to_ref(out, hi_out, lo_out, name="out")
    assert len(grads) == len(hi_grads)
    for i, (g, hi, lo) in enumerate(zip(grads, hi_grads, lo_grads)):
        assert_close_to_ref(g, hi, lo, name=f"grad[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,kwargs", [
    ((3, 7, 384), {}),
    ((5, 1023), {"eps": 1e-12}),
    ((2, 1, 64), {"elementwise_affine": False}),
    ((4, 96), {"bias": False}),
])
def test_layer_norm_matches_torch(backend, shape, kwargs, poison):
    torch.manual_seed(0)
    hidden = shape[-1]
    ref = nn.LayerNorm(hidden, **kwargs)
    fb = fnn.LayerNorm(hidden, **kwargs, backend=backend)
    for p in ref.parameters():  # random affine parameters, not the ones/zeros init
        nn.init.normal_(p, mean=0.5, std=0.5)
    assert list(fb.state_dict()) == list(ref.state_dict())
    fb.load_state_dict(ref.state_dict(), strict=True)
    assert repr(fb) == repr(ref)
    x = torch.randn(shape) * 3 + 1
    _check_against_torch(fb, ref, x)


def test_layer_norm_bf16_input_fp32_params(poison):
    torch.manual_seed(1)
    ref, fb = nn.LayerNorm(384), fnn.LayerNorm(384)
    nn.init.normal_(ref.weight)
    fb.load_state_dict(ref.state_dict())
    x = torch.randn(6, 384).to(torch.bfloat16)
    out = fb(x)
    assert out.dtype == torch.bfloat16
    hi = torch.nn.functional.layer_norm(x.double(), (384,), ref.weight.double(), ref.bias.double(), ref.eps)
    assert_close_to_ref(out, hi, hi.to(torch.bfloat16))


def test_layer_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="normalized_shape"):
        fnn.LayerNorm((4, 8))
    assert fnn.LayerNorm([8]).normalized_shape == (8,)
    with pytest.raises(ValueError, match="last dim 8"):
        fnn.LayerNorm(8)(torch.randn(2, 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(backend, approximate, poison):
    torch.manual_seed(2)
    fb, ref = fnn.GELU(approximate, backend=backend), nn.GELU(approximate)
    assert isinstance(fb, nn.GELU) and repr(fb) == repr(ref) and not fb.state_dict()
    _check_against_torch(fb, ref, torch.randn(3, 5, 97) * 3)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 32))
        self.norm2d = nn.LayerNorm((4, 8))  # over two dims: left as it is

    def forward(self, x):
        h = self.mlp(self.norm(x)) + x
        return self.norm2d(h.view(*h.shape[:-1], 4, 8))


def test_swap_modules_keeps_parameters_and_outputs(poison):
    torch.manual_seed(3)
    model = nn.Sequential(_Block(), nn.GELU(), nn.LayerNorm(8, eps=1e-6))
    with torch.no_grad():
        model[0].norm.weight.normal_()
        model[2].bias.normal_()
    x = torch.randn(2, 5, 32)
    ref, ref_grads = _run(model, x)
    params = list(model.parameters())
    keys = list(model.state_dict())
    swapped = fnn.swap_modules(model, backend="reference")
    assert swapped is model
    assert type(model[0].norm) is fnn.LayerNorm and type(model[0].mlp[1]) is fnn.GELU
    assert type(model[1]) is fnn.GELU and type(model[2]) is fnn.LayerNorm and model[2].eps == 1e-6
    assert model[0].mlp[1].approximate == "tanh" and model[0].norm.backend == "reference"
    assert type(model[0].norm2d) is nn.LayerNorm
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    out, grads = _run(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert isinstance(fnn.swap_modules(nn.GELU()), fnn.GELU)
    fnn.set_backend(model, "torch")
    assert model[1].backend == "torch"


# ---- BERT blocks vs transformers' -------------------------------------------------------------


def _configs(hidden_act="gelu"):
    transformers = pytest.importorskip("transformers")
    from fastbert.models import BertConfig

    kw = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, hidden_act=hidden_act,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    hf_cfg = transformers.BertConfig(**kw)
    hf_cfg._attn_implementation = "eager"
    return BertConfig(**kw), hf_cfg, transformers


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_layer_matches_transformers_padded_and_varlen(backend, poison):
    cfg, hf_cfg, transformers = _configs()
    from transformers.models.bert.modeling_bert import BertLayer as HFBertLayer

    torch.manual_seed(4)
    hf = HFBertLayer(hf_cfg).eval()
    fb = fnn.BertLayer(cfg).eval()
    fnn.set_backend(fb, backend)
    assert list(fb.state_dict()) == list(hf.state_dict())
    fb.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 9, 64)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(x, additive)
        out, probs = fb(x, mask)
        assert probs is None
        real = mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
        packed, indices, cu_seqlens, max_seqlen = fnn.unpad_input(x, mask)
        out_varlen, _ = fb(packed, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        torch.testing.assert_close(out_varlen, ref[real], atol=1e-5, rtol=1e-5)


def test_bert_layer_dropout_trains():
    cfg, _, _ = _configs()
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.5
    fb = fnn.BertLayer(cfg).train()
    x = torch.randn(2, 9, 64)
    torch.manual_seed(5)
    a, _ = fb(x)
    torch.manual_seed(5)
    b, _ = fb(x)
    c, _ = fb(x)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded by torch's RNG
    fb.eval()
    d, _ = fb(x)
    e, _ = fb(x)
    assert torch.equal(d, e)
