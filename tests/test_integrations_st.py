"""sentence-transformers through fastbert.integrations.sentence_transformers.patch(): the
all-MiniLM-L6-v2 bi-encoder and a cross-encoder built on its BERT classifier, patched vs plain on
mixed-length EN / PT sentences."""

from __future__ import annotations


import pytest
from _minilm import minilm_checkpoint
import torch

from fastbert.integrations.sentence_transformers import is_patched, patch, unpatch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "A fused attention kernel never writes the full score matrix to memory, so long sequences fit in SRAM tiles.",
    "Padding tokens cost compute that a varlen kernel skips.",
    "Hi.",
    "Where is the nearest train station?",
    "The cat sleeps on the warm windowsill all afternoon.",
    "Layer normalisation rescales each token's features.",
    "O rato roeu a roupa do rei de Roma.",
    "Onde fica a estação de comboios mais próxima?",
    "O gato dorme no parapeito quente da janela durante a tarde toda.",
    "A atenção é tudo o que precisas.",
    "Bom dia!",
    "Os núcleos de atenção fundidos nunca escrevem a matriz de pontuações inteira na memória.",
    "Lisbon is the capital of Portugal.",
    "Lisboa é a capital de Portugal e fica junto ao rio Tejo.",
]
QUERIES = ["where can I catch a train", "a sleeping cat", "capital city of Portugal"]


@pytest.fixture(scope="module")
def checkpoint():
    pytest.importorskip("sentence_transformers")
    return minilm_checkpoint()


def test_bi_encoder_patched_matches_plain(checkpoint):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(checkpoint, device="cpu")
    encode = dict(batch_size=8, convert_to_tensor=True)  # batches of mixed lengths: padding in each
    plain_docs, plain_q = model.encode(SENTENCES, **encode), model.encode(QUERIES, **encode)
    assert patch(model) is model and is_patched(model)
    dims = []
    encoder = model[0].auto_model.encoder.__dict__["_fastbert_encoder"]
    encoder.layer[0].register_forward_pre_hook(lambda mod, args: dims.append(args[0].dim()))
    docs, q = model.encode(SENTENCES, **encode), model.encode(QUERIES, **encode)
    assert dims and set(dims) == {2}, "every batch runs packed (total_tokens, hidden)"
    cos = torch.nn.functional.cosine_similarity(docs, plain_docs)
    assert cos.min() >= 0.99999, f"min cosine {cos.min().item():.7f}"
    assert torch.equal((q @ docs.T).argsort(dim=1, descending=True)[:, :5],
                       (plain_q @ plain_docs.T).argsort(dim=1, descending=True)[:, :5])
    unpatch(model)
    assert not is_patched(model)
    torch.testing.assert_close(model.encode(SENTENCES, **encode), plain_docs, rtol=0, atol=1e-6)


def test_cross_encoder_patched_matches_plain(checkpoint):
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)  # the classifier head is newly initialised
    model = CrossEncoder(checkpoint, num_labels=1, device="cpu")
    pairs = [(q, d) for q in QUERIES for d in SENTENCES[::3]]
    plain = model.predict(pairs, batch_size=8, convert_to_tensor=True, activation_fn=torch.nn.Identity())
    patch(model)
    got = model.predict(pairs, batch_size=8, convert_to_tensor=True, activation_fn=torch.nn.Identity())
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)


def test_patch_rejects_models_without_transformers():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="model: expected a sentence-transformers model holding a transformers"):
        patch(torch.nn.Sequential(torch.nn.Linear(2, 2)))
