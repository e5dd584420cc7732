"""The issue's sentence-transformers parity at full size (``-m slow``): all-MiniLM-L6-v2 patched vs
plain on 200 varied EN / PT sentences (the benchmark's generator, fastbert.bench.patched), batches
of mixed lengths after sentence-transformers' length sort: cosine >= 0.99999 for every sentence
and the same top-5 ranking for every query of a small retrieval set. The default run keeps its
sentence-transformers tests at <= 20 sentences (tests/test_integrations_st.py)."""

from __future__ import annotations

import pytest
import torch
from _minilm import minilm_checkpoint

from fastbert.bench.patched import sentences
from fastbert.integrations.sentence_transformers import patch

QUERIES = ["a dog at the library", "o relatório comprido", "bread recipe", "o rio ao entardecer",
           "the benchmark results", "a bicicleta avariada", "good morning", "porque o prazo termina amanhã"]


@pytest.mark.slow
def test_bi_encoder_patched_matches_plain_on_200_sentences():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    path = minilm_checkpoint()
    texts = sentences(200, seed=7)
    plain = SentenceTransformer(path, device="cpu")
    patched = patch(SentenceTransformer(path, device="cpu"))
    encode = dict(batch_size=32, convert_to_tensor=True)
    docs, plain_docs = patched.encode(texts, **encode), plain.encode(texts, **encode)
    q, plain_q = patched.encode(QUERIES, **encode), plain.encode(QUERIES, **encode)
    cos = torch.nn.functional.cosine_similarity(docs, plain_docs)
    assert cos.min() >= 0.99999, f"min cosine {cos.min().item():.7f} at {texts[int(cos.argmin())]!r}"
    assert torch.nn.functional.cosine_similarity(q, plain_q).min() >= 0.99999
    # Ties (duplicate sentences) rank in any order: compare the top-5 scores' sentences as sets of texts.
    top, plain_top = ((a @ b.T).topk(5, dim=1).indices for a, b in ((q, docs), (plain_q, plain_docs)))
    for i in range(len(QUERIES)):
        assert {texts[j] for j in top[i].tolist()} == {texts[j] for j in plain_top[i].tolist()}, QUERIES[i]
