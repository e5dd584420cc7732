"""Smoke tests of the per-op overhead benchmark and the MLM benchmark's MiniLM size (cheap by
default; the MLM run is ``slow``). They check the harness runs and reports, not the numbers."""

from __future__ import annotations

import pytest

from fastbert.bench import overhead


def test_overhead_cases_cover_every_op_both_kinds():
    names = [c.name for c in overhead.cases(quick=True)]
    for op in ("attention", "layer_norm", "add&norm", "gelu", "bias-gelu", "geglu", "bias-geglu"):
        assert any(n.startswith(op) for n in names), (op, names)
    assert {c.kind for c in overhead.cases(quick=True)} == {"bert", "tiny"}


def test_overhead_quick_run_reports_both_directions(capsys):
    overhead.main(["--quick", "--threads", "1", "--only", "gelu 16x768"])
    out = capsys.readouterr().out
    assert "QUICK" in out and "us/call" in out
    res = overhead.run(quick=True, rounds=1, threads=1, reps=2, only="add&norm 16x768")
    assert [r["direction"] for r in res["rows"]] == ["fwd", "fwd+bwd"]
    assert all(r["fastbert_s"] > 0 and r["torch_s"] > 0 for r in res["rows"])


def test_overhead_attention_case_matches_sdpa():
    """Both sides of an attention comparison compute the same thing (same input, same mask)."""
    import torch

    case = next(c for c in overhead.cases(quick=True) if "fill 0.5" in c.name)
    fb, th, _ = case.make()
    with torch.no_grad():
        torch.testing.assert_close(fb(), th(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_mlm_minilm_size_and_dropout_ratio():
    from fastbert.bench.mlm import run

    res = run(rounds=1, threads=1, layers=1, batch=2, seqlen=16, size="minilm")
    assert res["hidden"] == 384 and res["size"] == "minilm"
    assert res["dropout_on_vs_off"] > 0 and res["dropout_off"]["median_s"] > 0


def test_overhead_records_the_malloc_setting(capsys):
    """The steady-state malloc setting is applied before timing and stated in the table and JSON."""
    res = overhead.run(quick=True, rounds=1, threads=1, reps=2, only="gelu 16x768")
    assert set(res["malloc"]) >= {"allocator", "mallopt"}
    if res["malloc"]["allocator"].startswith("glibc"):
        assert res["malloc"]["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert "malloc: " in overhead.format_rows(res).splitlines()[0]
