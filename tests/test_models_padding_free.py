"""What the README says of padding-free batches (``DataCollatorWithFlattening``) and fastbert's own
models: no ``cu_seq_lens_q`` keyword, and restarting ``position_ids`` in one row are positions
only (the packed sequences attend to each other, as in transformers' sdpa path before 5.25); ``register()`` /
``patch()`` are the routes that keep them apart (tests/test_integrations_packed.py)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert.models as models  # noqa: E402


def test_fastbert_models_treat_a_packed_row_as_one_sequence_as_the_readme_says():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=40, max_position_embeddings=16)
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    fb = models.BertModel(config).eval()
    fb.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (5, 3, 6)]
    batch = transformers.DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": s} for s in seqs])
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        packed = fb(ids, position_ids=pos).last_hidden_state[0]
        sdpa = hf(ids, position_ids=pos).last_hidden_state[0]
        alone = torch.cat([fb(torch.tensor([s])).last_hidden_state[0] for s in seqs])
    assert float((packed - alone).abs().max()) > 1e-3  # one sequence, not each on its own
    if float((sdpa - alone).abs().max()) < 1e-4:
        # transformers >= 5.25 keeps packed sequences apart without an attention_mask
        # (create_bidirectional_mask reads restarting positions): the gap the README names
        from packaging.version import Version
        assert Version(transformers.__version__) >= Version("5.25")
    else:  # before 5.25 transformers' sdpa path attends across them too: the same numbers
        torch.testing.assert_close(packed, sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        fb(ids, position_ids=pos, cu_seq_lens_q=torch.tensor([0, 5, 8, 14], dtype=torch.int32))
