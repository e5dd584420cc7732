"""Smoke tests of the per-op overhead benchmark and the MLM benchmark's MiniLM size (cheap by
default; the MLM run is ``slow``). They check the harness runs and reports, not the numbers."""

from __future__ import annotations

import pytest

from fastbert.bench import overhead, timing


@pytest.fixture(autouse=True)
def mallopt_calls(monkeypatch):
    """mallopt stubbed with a recorder (the real one cannot be undone in the test process) and
    steady_malloc's once-per-process record reset."""
    calls = []
    monkeypatch.setattr(timing, "_mallopt", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(timing, "_steady_record", None)
    return calls


def test_overhead_cases_cover_every_op_both_kinds():
    names = [c.name for c in overhead.cases(quick=True)]
    for op in ("attention", "layer_norm", "add&norm", "gelu", "bias-gelu", "geglu", "bias-geglu"):
        assert any(n.startswith(op) for n in names), (op, names)
    assert {c.kind for c in overhead.cases(quick=True)} == {"bert", "tiny"}


def test_overhead_quick_run_reports_both_directions(capsys, monkeypatch):
    overhead.main(["--quick", "--threads", "1", "--only", "gelu 16x768"])
    out = capsys.readouterr().out
    assert "QUICK" in out and "us/call" in out
    monkeypatch.setattr(timing, "_steady_record", None)
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


def test_overhead_masks_have_their_fill():
    """The tiny "mask 0.75" row is 12 of 16 keys (not all ones); BERT's 0.5 spreads 128 .. 1."""
    assert overhead._mask(1, 16, 0.75).sum().item() == 12
    assert overhead._mask(8, 128, 0.5).sum(1).tolist() == [128, 109, 91, 73, 55, 37, 19, 1]
    assert overhead._mask(8, 128, 1.0).all()


@pytest.mark.slow
def test_mlm_minilm_size_and_dropout_ratio():
    from fastbert.bench.mlm import run

    res = run(rounds=1, threads=1, layers=1, batch=2, seqlen=16, size="minilm", warmup=1)
    assert res["malloc"]["mallopt"] is None  # the library run leaves malloc alone
    assert res["hidden"] == 384 and res["size"] == "minilm"
    assert res["dropout_on_vs_off"] > 0 and res["dropout_off"]["median_s"] > 0


def test_overhead_records_the_malloc_setting(capsys, monkeypatch, mallopt_calls):
    """The library run leaves malloc alone by default; the command line applies the steady setting
    before timing (``--default-malloc``: not); both state it in the table and JSON."""
    res = overhead.run(quick=True, rounds=1, threads=1, reps=2, only="gelu 16x768")
    assert mallopt_calls == [] and res["malloc"]["mallopt"] is None
    assert "malloc: " in overhead.format_rows(res).splitlines()[0]
    overhead.main(["--quick", "--threads", "1", "--only", "gelu 16x768", "--default-malloc"])
    assert mallopt_calls == [] and "defaults" in capsys.readouterr().out
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    overhead.main(["--quick", "--threads", "1", "--only", "gelu 16x768"])
    out = capsys.readouterr().out
    if timing.steady_malloc(False)["allocator"].startswith("glibc"):
        assert len(mallopt_calls) == 2 and "steady (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2147483647)" in out
