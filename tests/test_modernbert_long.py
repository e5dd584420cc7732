"""fastbert's ModernBertModel on a batch longer than ``max_position_embeddings``: transformers'
ModernBERT computes its rotary angles per call and runs it, and so does ``patch()``; fastbert's
own model raised the rotary op's "cos, sin: expected at least seqlen rows" (found by the new-user
pass). Now it computes tables for that length and agrees with transformers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as models  # noqa: E402
from _tiny_modernbert import TOL, tiny_config  # noqa: E402


@pytest.mark.parametrize("unpad", [True, False])
def test_modernbert_runs_past_max_position_embeddings_as_transformers_does(unpad):
    config = tiny_config()  # max_position_embeddings 64
    torch.manual_seed(0)
    hf = transformers.ModernBertModel(config).eval()
    fb = models.ModernBertModel(config, unpad=unpad).eval()
    fb.load_state_dict(hf.state_dict())
    seqlen = config.max_position_embeddings + 29
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, config.vocab_size, (2, seqlen), generator=g)
    mask = torch.ones(2, seqlen, dtype=torch.long)
    mask[1, 70:] = 0  # the second row still longer than the table
    ids = ids * mask
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        out = fb(ids, attention_mask=mask).last_hidden_state
        short = fb(ids[:, :40], attention_mask=mask[:, :40]).last_hidden_state  # the buffers still serve
        short_ref = hf(ids[:, :40], attention_mask=mask[:, :40]).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    torch.testing.assert_close(short, short_ref, **TOL)
    assert fb.rotary_emb.tables()["full_attention"][0].shape[0] == config.max_position_embeddings
