"""Padding-free (packed) batches from transformers' ``DataCollatorWithFlattening`` through
``attn_implementation="fastbert"`` and through patch(): each sequence attends only to itself, so
the packed row equals running every sequence alone (transformers' sdpa and eager paths attend
across the boundaries)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, DataCollatorWithFlattening  # noqa: E402

from fastbert.integrations.transformers import packed_sequences, patch, register  # noqa: E402

LENGTHS = (5, 9, 1, 6)


def _config(**kw):
    return BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 120, (n,), generator=g).tolist() for n in LENGTHS]


def _packed(seqs, flash_kwargs: bool):
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collate([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    return dict(batch)


def _models(**kw):
    torch.manual_seed(0)
    ref = BertModel(_config(**kw)).eval()
    register()
    ours = BertModel(_config(attn_implementation="fastbert", **kw)).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "fastbert"
    return ref, ours


def _alone(ref, seqs, **kw):
    with torch.no_grad():
        return [ref(input_ids=torch.tensor([s]), **kw) for s in seqs]


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("patched", [False, True], ids=["attn_implementation", "patch"])
def test_padding_free_batch_equals_each_sequence_alone(flash_kwargs, patched):
    ref, ours = _models()
    if patched:
        patch(ours)
    seqs = _sequences()
    batch = _packed(seqs, flash_kwargs)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and ("cu_seq_lens_q" in batch) == flash_kwargs
    with torch.no_grad():
        out = ours(**batch).last_hidden_state[0]
    want = torch.cat([o.last_hidden_state[0] for o in _alone(ref, seqs)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # The batch is a real test: one row attending across the boundaries differs. (transformers'
    # own sdpa path did so until 5.25, which detects restarting positions when no attention_mask
    # is given; an all-ones mask keeps it from doing so in every version.)
    ids = batch["input_ids"]
    with torch.no_grad():
        crossing = ref(input_ids=ids, position_ids=batch.get("position_ids"),
                       attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    assert (crossing - want).abs().max() > 1e-3, "one sequence across the boundaries"


def test_padding_free_attentions_are_per_sequence():
    ref, ours = _models()
    ref.set_attn_implementation("eager")
    seqs = _sequences(1)
    with torch.no_grad():
        out = ours(**_packed(seqs, True), output_attentions=True)
    alone = _alone(ref, seqs, output_attentions=True)
    start = 0
    for n, a in zip(LENGTHS, alone):
        for got, want in zip(out.attentions, a.attentions):
            block = got[0, :, start:start + n]
            torch.testing.assert_close(block[..., start:start + n], want[0], rtol=1e-5, atol=1e-6)
            assert (block[..., :start] == 0).all() and (block[..., start + n:] == 0).all()
        start += n


def test_packed_sequences_boundaries():
    pos = torch.tensor([[2, 3, 4, 2, 3, 2]])  # RoBERTa-style positions_start 2
    cu, max_len = packed_sequences({"position_ids": pos}, 1, 6)
    assert cu.tolist() == [0, 3, 5, 6] and cu.dtype == torch.int32 and max_len == 3
    assert packed_sequences({"position_ids": torch.arange(6)[None]}, 1, 6) is None
    assert packed_sequences({"position_ids": pos.expand(2, -1)}, 2, 6) is None
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    assert packed_sequences({"cu_seq_lens_q": cu, "max_length_q": 4}, 1, 6)[1] == 4
    with pytest.raises(ValueError, match="cu_seq_lens_q: a padding-free batch has batch size 1, got 2"):
        packed_sequences({"cu_seq_lens_q": cu}, 2, 6)
