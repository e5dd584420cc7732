"""The benchmark suite: formulas, statistics, the reference check, and a CPU smoke run of
``fastbert bench --quick`` through the CLI (JSON schema and plots; never an assertion on speed)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

from fastbert.bench.core import Case, Impl, Prepared, check_result, variable_lengths
from fastbert.bench.formulas import attention_flops, encoder_tokens, gelu_bytes, layer_norm_bytes
from fastbert.bench.runner import run_case
from fastbert.bench.timing import Stats, TimingPlan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_flops_count_valid_pairs_only():
    # lengths 3 and 5 padded to 5: valid pairs 9 + 25 = 34, not 2 * 25
    fwd = attention_flops([3, 5], num_heads=2, head_dim=4, direction="fwd")
    assert fwd.amount == 4 * 34 * 2 * 4 and fwd.unit == "FLOP"
    assert attention_flops([3, 5], 2, 4, "bwd").amount == 2.5 * fwd.amount
    assert fwd.rate(1e-3) == (pytest.approx(fwd.amount / 1e-3 / 1e12), "TFLOP/s")


def test_byte_and_token_formulas():
    # add & norm, bf16 x with bf16 params: x, residual, y + three [hidden] vectors
    assert layer_norm_bytes(10, 8, torch.bfloat16, "fwd").amount == 3 * 10 * 8 * 2 + 3 * 8 * 2
    assert layer_norm_bytes(10, 8, torch.float32, "bwd").amount == 4 * 10 * 8 * 4 + 2 * 10 * 4 + 4 * 8 * 4
    assert gelu_bytes(10, 8, torch.float16, "fwd").amount == 2 * 10 * 8 * 2 + 8 * 2
    assert gelu_bytes(10, 8, torch.float32, "bwd").amount == 3 * 10 * 8 * 4 + 2 * 8 * 4
    tokens = encoder_tokens([3, 5, 1])
    assert tokens.amount == 9 and tokens.rate(0.5) == (18.0, "tokens/s")


@pytest.mark.parametrize("batch, seqlen, fill", [(4, 128, 0.5), (32, 512, 0.5), (7, 100, 0.8), (5, 64, 0.25),
                                                 (3, 16, 1.0), (1, 97, 0.5)])
def test_variable_lengths_have_the_requested_fill(batch, seqlen, fill):
    lengths = variable_lengths(batch, seqlen, fill, seed=3)
    assert len(lengths) == batch and all(1 <= n <= seqlen for n in lengths)
    assert abs(sum(lengths) / (batch * seqlen) - fill) < 0.02
    if fill >= 0.5 and batch > 1:
        assert max(lengths) == seqlen
    assert variable_lengths(batch, seqlen, fill, seed=3) == lengths
    with pytest.raises(ValueError, match="fill"):
        variable_lengths(batch, seqlen, 0.0)


def test_stats_median_and_iqr():
    s = Stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s.median == 3.0 and s.quantile(0.25) == 2.0 and s.quantile(0.75) == 4.0 and s.iqr == 2.0
    assert Stats([7.0]).iqr == 0.0


def test_check_result_applies_the_tolerance_rule():
    g = torch.Generator().manual_seed(0)
    hi = torch.randn(64, 32, generator=g, dtype=torch.float64)
    lo = hi.float()
    ok = check_result(hi.float(), hi, lo, torch.float32, factor=2.0, floor_eps=4.0)
    assert ok["ok"] and ok["max_abs_err"] <= ok["tol"]
    bad = hi.float().clone()
    bad[3, 4] += 1e-3
    assert not check_result(bad, hi, lo, torch.float32, 2.0, 4.0)["ok"]
    nan = hi.float().clone()
    nan[0, 0] = float("nan")
    assert not check_result(nan, hi, lo, torch.float32, 2.0, 4.0)["ok"]
    assert not check_result(hi.float()[:3], hi, lo, torch.float32, 2.0, 4.0)["ok"]  # shape
    # tensor by tensor: a large tensor's tolerance does not cover a small one's error
    small = hi * 1e-3
    pair = check_result((hi.float(), small.float() + 1e-5), (hi, small), (lo, small.float()),
                        torch.float32, 2.0, 4.0)
    assert not pair["ok"] and pair["worst"] == 1


def test_check_floor_is_the_magnitude_of_what_cancels():
    """A gradient that is exactly 0 (attention's dq of a one-token sequence): the fp32 reference
    is exact there, a correct FlashAttention-style backward keeps a few ulp of rowsum(dO * O).
    The floor takes that magnitude (``floor_mags``), not the zero gradient's."""
    zero = torch.zeros(4, 8, dtype=torch.float64)
    residue = (zero + 3.5e-6).float()  # the 3.5e-06 torch-sdpa showed on the CPU
    assert not check_result(residue, zero, zero.float(), torch.float32, 2.0, 16.0)["ok"]
    assert check_result(residue, zero, zero.float(), torch.float32, 2.0, 16.0, floor_mags=[20.0])["ok"]
    assert not check_result(residue + 1e-3, zero, zero.float(), torch.float32, 2.0, 16.0, floor_mags=[20.0])["ok"]


def test_attention_backward_check_passes_sdpa_and_catches_an_error():
    """The bench's attention backward check on a batch with a one-token sequence: SDPA (correct,
    FlashAttention-style on the CPU) passes, the same gradients with one wrong entry fail."""
    from fastbert.bench import attention
    from fastbert.bench.core import Options

    case = next(c for c in attention.cases(Options(ops=("attention",), seqlens=(16,), batch=3,
                                                   directions=("bwd",)))
                if c.op == "attention")
    assert min(case.params["seqlens"]) == 1
    sdpa = next(i for i in case.impls if i.name == "torch-sdpa").prepare()
    ref = case.reference()
    grads = sdpa.result()
    assert case.check(grads, ref)["ok"], case.check(grads, ref)
    wrong = tuple(g.clone() for g in grads)
    wrong[0][-1, 0, 0] += 1e-3
    bad = case.check(wrong, ref)
    assert not bad["ok"] and bad["worst"] == 0


@pytest.mark.parametrize("interleave", [False, True])
def test_run_case_records_checks_skips_errors_and_ratios(interleave):
    x = torch.randn(1000, dtype=torch.float64)
    ref = (x, x.float())

    def impl(name, kind, fn, default=False, skip=None):
        return Impl(name, kind, prepare=lambda: Prepared(run=fn, result=fn), skip=skip, default=default)

    def broken():
        raise RuntimeError("kernel exploded")

    from fastbert.bench.formulas import Work

    case = Case(op="gelu", direction="fwd", label="t", params={}, x=1, x_name="rows", dtype=torch.float32,
                device="cpu", work=Work(4000.0, "B", "x + y"), reference=lambda: ref,
                impls=[impl("fastbert[a]", "fastbert", lambda: x.float() * 1.0, default=True),
                       impl("wrong", "competitor", lambda: x.float() + 1.0),
                       impl("slow", "competitor", lambda: (x.float() * 1.0).sort().values.sort().values[x.argsort().argsort()]),
                       impl("absent", "competitor", None, skip="not importable"),
                       impl("broken", "competitor", broken)])
    rec = run_case(case, TimingPlan(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0), interleave=interleave)
    assert [r["impl"] for r in rec["results"]] == [i.name for i in case.impls]
    by = {r["impl"]: r for r in rec["results"]}
    assert by["fastbert[a]"]["default"] and by["fastbert[a]"]["check"]["ok"]
    assert by["wrong"]["status"] == "ok" and not by["wrong"]["check"]["ok"]  # timed, but flagged
    assert by["slow"]["check"]["ok"]
    assert by["absent"]["status"] == "skipped" and by["absent"]["note"] == "not importable"
    assert by["broken"]["status"] == "error" and "kernel exploded" in by["broken"]["note"]
    base = by["fastbert[a]"]["median_s"]
    assert by["slow"]["fastbert_speedup"] == pytest.approx(by["slow"]["median_s"] / base)
    assert set(by["fastbert[a]"]["speedup_vs"]) == {"wrong", "slow"}
    assert all(len(r["samples_s"]) == 3 for r in rec["results"] if r["status"] == "ok")


@pytest.mark.parametrize("ops", [pytest.param(("attention", "gelu"), id="attention+gelu"),
                                 pytest.param(("attention", "layer_norm", "gelu", "encoder"), id="all",
                                              marks=pytest.mark.slow)])  # the encoder rows: ~30 s
def test_fastbert_bench_quick_smoke(ops, tmp_path, capsys):
    """``fastbert bench --quick`` on the CPU (tiny sizes): schema, samples, rates, plots."""
    from fastbert.cli import main

    out = tmp_path / "bench"
    only = [] if len(ops) == 4 else [arg for op in ops for arg in ("--op", op)]
    rc = main(["bench", "--quick", "--out", str(out), "--seqlens", "48", "--batch", "2", *only,
               "--rows", "64,128", "--layers", "1", "--reps", "3", "--warmup", "0", "--no-progress"])
    assert rc == 0, (out / "bench.txt").read_text()
    printed = capsys.readouterr().out
    assert "check = ok|FAIL error/tolerance" in printed  # the check column is explained
    assert re.search(rf"^plots: {re.escape(str(out))}/attention\.png, ", printed, re.M), printed
    record = json.loads((out / "bench.json").read_text())
    assert record["schema"] == "fastbert.bench/1" and record["complete"]
    for key in ("timestamp", "command", "options", "timing", "env", "cases", "description"):
        assert key in record
    env = record["env"]
    assert env["device"] and env["threads"] >= 1 and env["versions"]["torch"] == torch.__version__
    assert "sha" in env["git"] and env["device_name"]
    assert {c["op"] for c in record["cases"]} == set(ops)
    assert {(c["op"], c["direction"]) for c in record["cases"]} >= {("attention", "fwd"), ("attention", "bwd")} | (
        {("encoder", "infer"), ("encoder", "train")} if "encoder" in ops else set())
    timed = set()
    for case in record["cases"]:
        assert case["work"]["amount"] > 0 and case["work"]["formula"]
        for r in case["results"]:
            assert r["status"] in ("ok", "skipped"), r
            if r["impl"].startswith("fastbert[triton]"):  # interpreted under the tests' TRITON_INTERPRET=1
                assert r["status"] == "skipped" and "interpreter" in r["note"]
            if r["status"] == "skipped":
                assert r["note"]
                continue
            timed.add(r["impl"])
            assert r["check"]["ok"], r
            assert len(r["samples_s"]) >= 3 and all(s > 0 for s in r["samples_s"])
            assert r["median_s"] > 0 and r["iqr_s"] >= 0 and r["rate"] > 0 and r["rate_unit"]
        assert sum(r["default"] for r in case["results"]) == 1
        assert all(r["fastbert_speedup"] > 0 for r in case["results"]
                   if r["status"] == "ok" and not r["default"])
    assert {"fastbert[torch]", "torch-eager", "torch-sdpa"} | ({"hf-sdpa", "hf-eager"} if "encoder" in ops else set()) <= timed
    from fastbert.env import nvidia_driver_found

    if not nvidia_driver_found():  # skip reasons in a new user's words, as in `fastbert env`
        notes = [r["note"] or "" for c in record["cases"] for r in c["results"]]
        assert not any("cudaError" in n for n in notes), notes
    sdpa = [r for c in record["cases"] for r in c["results"] if r["impl"] == "torch-sdpa"]
    assert all(r["info"]["sdpa_backend"] for r in sdpa)
    for op in ops:
        png = out / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ticks = {c["x_tick"] for c in record["cases"] if c["op"] in ("attention", "encoder")}
    assert ticks == {"2x48"} and all(c["x_name"].startswith("batch x seqlen")
                                     for c in record["cases"] if c["op"] in ("attention", "encoder"))
    table = (out / "bench.txt").read_text()
    assert "TFLOP/s" in table and ("encoder" not in ops or ("hf-sdpa" in table and "tok/s" in table))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quick_sizes_give_every_plot_more_than_one_point(device):
    """Without size options every op's plot has two x points or more, and along the
    batch x seqlen axis the padded tokens per batch stay fixed (rates compare)."""
    from fastbert.bench import attention, encoder
    from fastbert.bench.core import Options, row_sizes

    for quick in (True, False):
        opts = Options(device=device, quick=quick)
        assert len(row_sizes(opts)) >= 2
        for op in (attention, encoder):
            pairs = op.sizes(opts)
            assert len(pairs) >= 2 and len({s * b for s, b in pairs}) == 1, (op.__name__, quick, pairs)


def test_plots_say_why_none_and_keep_one_style_per_impl(monkeypatch):
    from fastbert.bench import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    paths, why = report.write_plots("/nonexistent", [], "t", combined=False)
    assert paths == [] and "pip install matplotlib" in why
    styles = [tuple(report.style(name).values()) for name in report._STYLES]
    assert len(set(styles)) == len(styles)  # no two implementations look alike
    assert report.style("a-new-impl") == report.style("a-new-impl")  # unknown names: fixed too


def test_cpu_clock_ignores_time_spent_waiting():
    """``clock="cpu"`` counts this process's CPU seconds: a sleeping call costs ~0 (wall: >= 20 ms)."""
    import time

    from fastbert.bench.timing import measure

    nap = lambda: time.sleep(0.02)  # noqa: E731
    wall = measure(nap, "cpu", TimingPlan(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0))
    cpu = measure(nap, "cpu", TimingPlan(warmup=0, min_reps=2, max_reps=2, min_time_s=0.0, clock="cpu"))
    assert wall.median >= 0.02 and cpu.median < 0.01


def test_interleaved_setup_runs_before_every_call_and_ratios_pair_rounds():
    from fastbert.bench.timing import measure_interleaved, ratio_stats

    calls = []
    plan = TimingPlan(warmup=1, min_reps=4, max_reps=4, min_time_s=0.0)
    stats = measure_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", plan,
                                setup=lambda i: calls.append(f"setup {i}"))
    # setup i before every call of fns[i], warm-up included; the order rotates every round
    assert calls[0::2] == [f"setup {'ab'.index(c)}" for c in calls[1::2]]
    assert "".join(calls[1::2]) == "ab" + "ab" "ba" "ab" "ba"
    r = ratio_stats(Stats([2.0, 3.0, 4.0]), Stats([1.0, 1.0, 2.0]))
    assert r.samples == [2.0, 3.0, 2.0] and r.median == 2.0
    with pytest.raises(ValueError, match="equal length, got 2 and 1"):
        ratio_stats(Stats([1.0, 2.0]), Stats([1.0]))
    assert len(stats[0].samples) == len(stats[1].samples) == 4


@pytest.fixture
def mallopt_calls(monkeypatch):
    """steady_malloc's mallopt stubbed with a recorder and its once-per-process record reset: the
    real call cannot be undone and would change malloc for the rest of the test process."""
    from fastbert.bench import timing

    calls = []
    monkeypatch.setattr(timing, "_mallopt", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(timing, "_steady_record", None)
    return calls


def test_steady_malloc_record(monkeypatch, mallopt_calls):
    """Applied once (glibc here) and reported so; a preloaded allocator is named, not touched."""
    from fastbert.bench import timing

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    rec = timing.steady_malloc()
    if rec["allocator"] == "not glibc":
        pytest.skip("no glibc in this process")
    assert rec["mallopt"] is None and "jemalloc" in rec["why_not"] and mallopt_calls == []
    monkeypatch.delenv("LD_PRELOAD")
    assert timing.steady_malloc(enable=False)["mallopt"] is None and mallopt_calls == []
    rec = timing.steady_malloc()
    assert rec["allocator"].startswith("glibc ") and rec["mallopt"] == timing.STEADY_MALLOPT
    assert mallopt_calls == [(timing._M_MMAP_MAX, 0), (timing._M_TRIM_THRESHOLD, 2**31 - 1)]
    assert timing.steady_malloc(enable=False) == rec  # mallopt stays in force for the process
    assert timing.steady_malloc() == rec and len(mallopt_calls) == 2  # once per process
    assert "steady (M_MMAP_MAX=0" in timing.malloc_note(rec)


_MALLOC_PROBE = """
import ctypes
from fastbert.bench import timing

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped_by(nbytes):  # bytes in mmapped blocks while a block of nbytes is held
    p = libc.malloc(nbytes)
    held = libc.mallinfo2().hblkhd
    libc.free(p)
    return held

before = mapped_by(64 << 20)
rec = timing.steady_malloc()
print(before >= 64 << 20, mapped_by(64 << 20) < 64 << 20, rec["mallopt"] == timing.STEADY_MALLOPT)
"""


def test_steady_malloc_takes_effect_in_a_fresh_process():
    """The real mallopt, in a subprocess (it cannot be undone): a 64 MiB block is mmapped with
    glibc's defaults and comes from the heap once steady_malloc ran."""
    import ctypes
    import os
    import subprocess
    import sys

    try:
        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc >= 2.33 (mallinfo2) in this process")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split() == ["True", "True", "True"], out
