"""Non-finite inputs_embeds at padding positions (found by the new-user pass): the unpadded models
never read padding rows, but the embeddings' LayerNorm ran on every position before packing, so a
NaN / inf / 1e30 padding embed made the LayerNorm weight, position and token-type gradients NaN
(0 * nan in its backward). Now padding rows are zeroed before the embeddings when running packed:
outputs and every gradient equal those with finite padding embeds."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as models  # noqa: E402
from _tiny_modernbert import tiny_config  # noqa: E402

LENGTHS = (9, 4, 6)


def _model(kind):
    torch.manual_seed(0)
    if kind == "modernbert":
        return models.ModernBertModel(tiny_config()).train()
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=40, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return models.BertModel(config).train()


def _grads(model, embeds, mask):
    model.zero_grad()
    leaf = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=leaf, attention_mask=mask).last_hidden_state
    real = mask.bool()
    (out[real] * torch.linspace(-1, 1, out[real].numel()).view_as(out[real])).sum().backward()
    return out.detach(), leaf.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_padding_embeds_reach_no_gradient(kind, bad):
    model = _model(kind)
    g = torch.Generator().manual_seed(3)
    seqlen = max(LENGTHS)
    mask = (torch.arange(seqlen)[None] < torch.tensor(LENGTHS)[:, None]).long()
    embeds = torch.randn(len(LENGTHS), seqlen, 32, generator=g)  # finite everywhere, padding included
    poisoned = torch.where(mask.bool()[..., None], embeds, bad)
    out, dx, grads = _grads(model, embeds, mask)
    out_p, dx_p, grads_p = _grads(model, poisoned, mask)
    torch.testing.assert_close(out_p, out, rtol=0, atol=0)
    torch.testing.assert_close(dx_p, dx, rtol=0, atol=0)
    assert not bool(dx_p[~mask.bool()].any())  # padding embeds get zero gradient
    assert grads_p.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert bool(torch.isfinite(grads_p[name]).all()), name
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_packing_metadata_without_a_mask_zeroes_padding_embeds_too(kind):
    """Packing metadata (indices, cu_seqlens) without attention_mask is an accepted call: padding
    is then every position indices leave out, and NaN there reaches no gradient either (found in
    review: the zeroing read only the mask)."""
    from fastbert.nn.padding import unpad_metadata
    model = _model(kind)
    seqlen = max(LENGTHS)
    mask = (torch.arange(seqlen)[None] < torch.tensor(LENGTHS)[:, None]).long()
    indices, cu_seqlens, max_seqlen = unpad_metadata(mask)[:3]
    embeds = torch.randn(len(LENGTHS), seqlen, 32, generator=torch.Generator().manual_seed(4))
    poisoned = torch.where(mask.bool()[..., None], embeds, float("nan"))
    results = []
    for e in (embeds, poisoned):
        model.zero_grad()
        leaf = e.clone().requires_grad_(True)
        out = model(inputs_embeds=leaf, indices=indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).last_hidden_state
        out[mask.bool()].sum().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert results[0].keys() == results[1].keys() and results[0]
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_without_gradients_padding_embeds_are_left_alone():
    """No gradient, no zeroing (each row is normalised on its own): the real rows' outputs are
    the same bits with NaN padding, and no [batch, seqlen, hidden] select is paid."""
    model = _model("bert").eval()
    seqlen = max(LENGTHS)
    mask = (torch.arange(seqlen)[None] < torch.tensor(LENGTHS)[:, None]).long()
    embeds = torch.randn(len(LENGTHS), seqlen, 32, generator=torch.Generator().manual_seed(5))
    poisoned = torch.where(mask.bool()[..., None], embeds, float("nan"))
    from fastbert.models import _base
    with torch.no_grad():
        assert _base.embeds_without_padding(poisoned, mask, True) is poisoned
        out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        out_p = model(inputs_embeds=poisoned, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out_p[real], out[real], rtol=0, atol=0)
