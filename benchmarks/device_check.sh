#!/usr/bin/env bash
# fastbert device check: one command on a GPU machine without network access.
#
#   benchmarks/device_check.sh            # run every stage (GPU stages skip cleanly without a GPU)
#   benchmarks/device_check.sh --dry-run  # print each stage's command and time cap, run nothing
#
# Stages, each under `timeout` with its own cap (env 30 s, build 170 s, tests 120 s, bench up to
# 300 s), every cap cut to what is left of DEVICE_CHECK_BUDGET_S (default 450 s, so the whole run
# stays under 8 minutes; the benchmarks get whatever the earlier stages leave):
#   1. env    nvidia-smi, nvcc, Python package versions, `fastbert env`        -> setup.log
#   2. build  pip install --no-deps --no-build-isolation --no-index -e .
#             (FASTBERT_CUDA_ARCHS=90a, no host build, parallel CMake; wheels in
#             $FASTBERT_WHEELS or ./wheels are installed first); a failed build is
#             recorded and the later stages still run (tests import fastbert from the
#             repository root)                                                  -> setup.log
#   3. tests  pytest -m gpu tests (incl. CUDA-graph capture/replay tests)       -> tests.log, tests.xml
#   4. bench  python -m fastbert.bench --quick (no torch.compile competitors, no autotuning):
#             attention, layer_norm, gelu and the encoder at BERT-base and BERT-large shapes,
#             bf16                                                              -> bench.log, bench.json, bench.png
#   5. summary  stage statuses, test counts and the benchmark table             -> summary.txt
# Results go to $OUT when set, else ./device-results, as each stage finishes: at most 7 files,
# flat. Without a GPU: the build is skipped, the GPU tests skip (checking the collection), and
# the benchmarks run the CPU quick set (fp32), so the plumbing is exercised anywhere.
# Exit status: 0 when every stage that ran passed, 1 otherwise.

set -u -o pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./device-results}"
mkdir -p "$OUT" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-450}"
START=$(date +%s)
STAGES=""
FAILED=0

export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset TRITON_INTERPRET  # compiled Triton on the GPU; the interpreter is never timed

GPU=0
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
fi

log() { echo "[device_check $(( $(date +%s) - START ))s] $*"; }

# stage NAME CAP_S LOGFILE CMD... : run CMD under `timeout` (SIGINT first, so pytest and the
# benchmark runner write what they have), capped by CAP_S and by what is left of the budget.
stage() {
    local name="$1" cap="$2" logfile="$3"; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
    [ "$cap" -gt "$left" ] && cap="$left"
    if [ "$cap" -lt 5 ]; then
        STAGES+="$(printf '%-8s %-22s %6s %6s' "$name" "SKIPPED (no time left)" - -)"$'\n'
        FAILED=1; return
    fi
    {
        echo
        echo "=== stage $name (cap ${cap}s): $*"
    } >> "$logfile"
    if [ "$DRY_RUN" = 1 ]; then
        log "[dry-run] $name (cap ${cap}s): $*"
        STAGES+="$(printf '%-8s %-22s %6s %6s' "$name" "dry-run" 0 "$cap")"$'\n'
        return
    fi
    log "$name (cap ${cap}s) -> $logfile"
    local t0=$(date +%s) rc=0
    timeout -s INT -k 15 "$cap" "$@" >> "$logfile" 2>&1 || rc=$?
    local dt=$(( $(date +%s) - t0 )) status="ok"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT"; FAILED=1
    elif [ "$rc" != 0 ]; then status="FAILED (rc $rc)"; FAILED=1; fi
    log "$name: $status (${dt}s)"
    STAGES+="$(printf '%-8s %-22s %6s %6s' "$name" "$status" "$dt" "$cap")"$'\n'
}

skip_stage() {
    STAGES+="$(printf '%-8s %-22s %6s %6s' "$1" "skipped: $2" - -)"$'\n'
    log "$1: skipped ($2)"
}

env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo dirty)"
    nvidia-smi || echo "nvidia-smi: not available"
    nvcc --version || echo "nvcc: not available"
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "pytest", "pytest_benchmark", "hypothesis", "matplotlib",
             "numpy", "safetensors", "pybind11", "cmake", "ninja", "setuptools", "flash_attn", "xformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
    "$PY" -m fastbert env || echo "fastbert env: failed"
}

build() {
    # build requirements the machine may lack (pybind11, cmake, ninja) can travel as wheels
    local wheels="${FASTBERT_WHEELS:-./wheels}"
    if compgen -G "$wheels/*.whl" > /dev/null; then
        "$PY" -m pip install --no-index --no-deps "$wheels"/*.whl || echo "installing $wheels/*.whl failed"
    fi
    FASTBERT_CUDA_ARCHS=90a FASTBERT_BUILD_HOST=0 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
        && "$PY" -c "import fastbert._C as C; print('fastbert._C', getattr(C, '__version__', '?'), 'loaded')"
}

gpu_tests() {  # exit status 5 (nothing collected) is not a failure: no test is marked gpu yet
    local rc=0
    "$PY" -m pytest tests -m gpu -q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml" || rc=$?
    [ "$rc" = 5 ] && { echo "no test is marked gpu"; return 0; }
    return "$rc"
}

export PY OUT
export -f env_info build gpu_tests

log "OUT=$OUT python=$PY gpu=$GPU budget=${BUDGET}s dry_run=$DRY_RUN"

stage env 30 "$OUT/setup.log" bash -c env_info
if [ "$GPU" = 1 ] || [ "$DRY_RUN" = 1 ]; then
    stage build 170 "$OUT/setup.log" bash -c build
else
    skip_stage build "no GPU"
fi

stage tests 120 "$OUT/tests.log" bash -c gpu_tests

if [ "$GPU" = 1 ] || [ "$DRY_RUN" = 1 ]; then
    BENCH_ARGS=(--quick --op all --model base,large --dtype bf16)
else
    BENCH_ARGS=(--quick --op all --model base)  # the CPU quick set: fp32, 2-layer encoder
fi
stage bench 300 "$OUT/bench.log" "$PY" -m fastbert.bench "${BENCH_ARGS[@]}" --out "$OUT" \
    --plot combined --no-progress

# summary: stage table, test counts, the benchmark table (bench.txt folded in to keep the file count low)
SUMMARY="$OUT/summary.txt"
{
    echo "fastbert device check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  git $(git rev-parse --short HEAD 2>/dev/null)  gpu=$GPU dry_run=$DRY_RUN"
    echo "total $(( $(date +%s) - START ))s of ${BUDGET}s budget"
    echo
    printf '%-8s %-22s %6s %6s\n' stage status secs cap
    printf '%s' "$STAGES"
    echo
    if [ -f "$OUT/tests.xml" ]; then
        "$PY" - "$OUT/tests.xml" <<'EOF' || true
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("gpu tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**tot))
for s in suites:
    for case in s.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"  FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:200]}")
EOF
    else
        echo "gpu tests: no junit file"
    fi
    echo
    if [ -f "$OUT/bench.txt" ]; then cat "$OUT/bench.txt"; else echo "bench: no table"; fi
} > "$SUMMARY" 2>&1
rm -f "$OUT/bench.txt" "$OUT"/*.tmp
log "summary -> $SUMMARY; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAILED"
