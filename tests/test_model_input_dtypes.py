"""Model inputs of the wrong dtype (found by the new-user pass): ids that ``nn.Embedding`` cannot
take are a TypeError naming the argument (was torch's "Expected tensor for argument #1 'indices'"),
ModernBERT's input_ids out of the vocabulary a ValueError naming them (was an IndexError), and
floating inputs_embeds of another dtype than the model's run as transformers' BERT runs them (the
sum with the position / type embeddings is in the table's dtype) instead of failing in the first
GEMM; integer inputs_embeds are a TypeError naming inputs_embeds."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as models  # noqa: E402
from _tiny_modernbert import tiny_config  # noqa: E402

LENGTHS = (9, 5, 1)


def _bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=40, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    fb = models.BertModel(config).eval()
    fb.load_state_dict(hf.state_dict())
    return hf, fb


def _batch(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seqlen = max(LENGTHS)
    ids = torch.randint(3, vocab, (len(LENGTHS), seqlen), generator=g)
    mask = (torch.arange(seqlen)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_bert_ids_of_a_dtype_embedding_cannot_take_name_the_argument(dtype):
    _, fb = _bert()
    ids, mask = _batch(50, 1)
    with pytest.raises(TypeError, match=rf"^input_ids: expected dtype torch.int64 or torch.int32, got {dtype}$"):
        fb(ids.to(dtype), attention_mask=mask)
    for name, bad in (("token_type_ids", torch.zeros_like(ids, dtype=torch.float)),
                      ("position_ids", torch.arange(ids.shape[1])[None].to(dtype))):
        with pytest.raises(TypeError, match=rf"^{name}: expected dtype torch.int64 or torch.int32, got {bad.dtype}$"):
            fb(ids, attention_mask=mask, **{name: bad})
    with torch.no_grad():  # int32 everywhere still runs, as int64 does
        ref = fb(ids, attention_mask=mask).last_hidden_state
        out = fb(ids.int(), attention_mask=mask.int(), token_type_ids=torch.zeros_like(ids, dtype=torch.int32),
                 position_ids=torch.arange(ids.shape[1], dtype=torch.int32)[None]).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bert_low_precision_inputs_embeds_run_as_transformers_runs_them(dtype):
    hf, fb = _bert()
    ids, mask = _batch(50, 2)
    embeds = (hf.get_input_embeddings()(ids).detach() * 3).to(dtype)  # fresh values, then rounded
    leaf = embeds.clone().requires_grad_(True)
    out = fb(inputs_embeds=leaf, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.float32
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # transformers promotes to fp32
        same = fb(inputs_embeds=embeds.float(), attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.detach(), same, rtol=0, atol=0)
    out[real].pow(2).sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == dtype and bool(leaf.grad[real].abs().sum() > 0)
    assert bool(torch.isfinite(leaf.grad).all())


def test_integer_inputs_embeds_name_the_argument():
    _, fb = _bert()
    ids, mask = _batch(50, 3)
    with pytest.raises(TypeError, match=r"^inputs_embeds: expected a floating-point dtype, got torch.int64$"):
        fb(inputs_embeds=torch.ones(*ids.shape, 32, dtype=torch.long), attention_mask=mask)
    mb = models.ModernBertModel(tiny_config()).eval()
    with pytest.raises(TypeError, match=r"^inputs_embeds: expected a floating-point dtype, got torch.int32$"):
        mb(inputs_embeds=torch.ones(*ids.shape, 32, dtype=torch.int32), attention_mask=mask)


def test_modernbert_input_ids_are_checked_as_berts_are():
    config = tiny_config()
    torch.manual_seed(0)
    hf = transformers.ModernBertModel(config).eval()
    mb = models.ModernBertModel(config).eval()
    mb.load_state_dict(hf.state_dict())
    ids, mask = _batch(config.vocab_size, 4)
    bad = ids.clone()
    bad[1, 2] = config.vocab_size
    with pytest.raises(ValueError, match=rf"^input_ids: expected values in \[0, {config.vocab_size - 1}\], "
                                         rf"got values in \[0, {config.vocab_size}\]$"):
        mb(bad, attention_mask=mask)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"^input_ids: expected values in \[0, 96\], got values in \[-1, "):
        mb(bad, attention_mask=mask)
    with pytest.raises(TypeError, match=r"^input_ids: expected dtype torch.int64 or torch.int32, got torch.int16$"):
        mb(ids.short(), attention_mask=mask)
    embeds = hf.get_input_embeddings()(ids).detach().bfloat16()
    with torch.no_grad():  # bf16 embeds into the fp32 model: the fp32 model on the rounded values
        out = mb(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        ref = hf(inputs_embeds=embeds.float(), attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
