#!/usr/bin/env bash
# One command for a GPU machine (`make gpu-check`): set-up, the full test suite on CUDA,
# compute-sanitizer memcheck on the CUDA tests, and the bf16 GPU benchmark sweep (docs/math.md §5
# wt103-base / wt103-wide / wt103-deep, every provider side by side, dense bf16 matmul rate).
# Everything lands in bench/results/ as <date>_<device>_<commit>_*.{log,xml,csv,png}.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # CPU only: the same steps at tiny sizes (checks the script)
#
# Python: $PYTHON if set; else python3 when its torch sees CUDA; else `make venv` (.venv, with
# TORCH_SPEC=... choosing the CUDA build). Exit status: non-zero if any step failed; the summary
# at the end lists each step.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------- python + torch
has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ $DRY_RUN == 1 ]]; then
    PY="$(command -v python3)"
    [[ -x "$REPO/.venv/bin/python" ]] && PY="$REPO/.venv/bin/python"
elif has_cuda_torch python3; then
    PY="$(command -v python3)"
else
    echo "gpu_check: python3 has no CUDA torch; building .venv (make venv TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0})"
    make -C "$REPO" venv ${TORCH_SPEC:+TORCH_SPEC="$TORCH_SPEC"} || { echo "gpu_check: venv set-up failed"; exit 2; }
    PY="$REPO/.venv/bin/python"
fi
if [[ $DRY_RUN == 0 ]] && ! has_cuda_torch "$PY"; then
    echo "gpu_check: $PY has no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU machine"
    exit 2
fi
missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("pytest", "pytest_benchmark", "tqdm", "matplotlib", "numpy", "ninja", "expecttest")
               if importlib.util.find_spec(m) is None))
PY
)
if [[ -n "$missing" ]]; then
    echo "gpu_check: installing missing modules: $missing"
    "$PY" -m pip install --quiet ${missing//_/-} || echo "gpu_check: WARNING: could not install $missing"
fi

RESULTS="$REPO/bench/results"
[[ $DRY_RUN == 1 ]] && RESULTS="${GPU_CHECK_RESULTS:-$(mktemp -d)}"  # a dry run keeps results/ clean
mkdir -p "$RESULTS"
DEVICE=cuda; [[ $DRY_RUN == 1 ]] && DEVICE=cpu
PREFIX="$RESULTS/$("$PY" -c "
import torch; from bench import report
print(report.results_path(report.metadata(torch.device('$DEVICE'))).stem)")"
echo "gpu_check: results under ${PREFIX}_*"
"$PY" -m define_kernels.info | tee "${PREFIX}_info.log"
{ nvidia-smi 2>&1 || echo "nvidia-smi not found"; } >> "${PREFIX}_info.log"

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME LOGFILE CMD...: run, tee the log, record the exit status
    local name="$1" log="$2"; shift 2
    echo; echo "=== $name: $*"
    "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-28s exit %-3s %s' "$name" "$status" "$log")")
    [[ $status != 0 ]] && FAILED=1
    return 0
}

# ---------------------------------------------------------------------------- tests
if [[ $DRY_RUN == 1 ]]; then
    step "tests (dry run: bench)" "${PREFIX}_tests.log" "$PY" -m pytest python_tests/test_bench.py -q -p no:cacheprovider
else
    step "tests on CUDA" "${PREFIX}_tests.log" "$PY" -m pytest python_tests -q -p no:cacheprovider -rs \
        --junitxml="${PREFIX}_tests.xml"
fi

SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [[ ! -f python_tests/test_cuda.py ]]; then
    SUMMARY+=("memcheck                     not run: python_tests/test_cuda.py does not exist"); FAILED=1
elif [[ $DRY_RUN == 1 ]]; then
    SUMMARY+=("memcheck                     not run: dry run (would use ${SANITIZER:-no compute-sanitizer found})")
elif [[ -z "$SANITIZER" ]]; then
    SUMMARY+=("memcheck                     not run: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"); FAILED=1
else
    # The caching allocator hides out-of-bounds accesses inside its blocks: turn it off.
    step "memcheck (test_cuda.py)" "${PREFIX}_memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
        "$PY" -m pytest python_tests/test_cuda.py -q -p no:cacheprovider -x
fi

# ---------------------------------------------------------------------------- benchmarks
CORPUS=wikitext-2
"$PY" -c "from bench import workloads; workloads.find_data_dir()" 2>/dev/null || CORPUS=zipf
if [[ $DRY_RUN == 1 ]]; then
    TINY="custom:V=997,n=32,k=128,m=64,N=2,g=4"
    BENCH=("$PY" -m bench.run --device cpu --dtypes float32 --reps 1 --warmup 1 --compile-backend aot_eager --no-progress)
    step "bench (dry run)" "${PREFIX}_bench_main.log" "${BENCH[@]}" --workload "$TINY" --tokens 256 --providers all \
        --corpus "$CORPUS" --csv "${PREFIX}_main.csv"
    step "bench tokens (dry run)" "${PREFIX}_bench_tokens.log" "${BENCH[@]}" --workload "$TINY" --tokens 64,256 \
        --modes train --providers embedding,define-torch --csv "${PREFIX}_tokens.csv"
    step "bench vocab (dry run)" "${PREFIX}_bench_vocab.log" "${BENCH[@]}" --workload "$TINY" --vocab 500,2000 \
        --tokens 256 --modes train --providers embedding,define-torch --csv "${PREFIX}_vocab.csv"
else
    BENCH=("$PY" -m bench.run --device cuda --dtypes bfloat16 --reps 20 --warmup 3)
    # 1. the headline: every provider (Triton, CUDA C++, reference, compiled, sparse, cache,
    #    relatives), every mode, 16,384 real-text ids per batch, dense bf16 matmul rate.
    step "bench wt103 x3" "${PREFIX}_bench_main.log" "${BENCH[@]}" \
        --workload wt103-base,wt103-wide,wt103-deep --tokens 16384 --corpus "$CORPUS" --csv "${PREFIX}_main.csv"
    # 2. throughput vs tokens per batch, 3. training-step time vs vocabulary size.
    FAST=embedding,embedding-sparse,define-torch,define-triton,define-triton-sparse,define-cuda,define-cuda-sparse,define-cache
    step "bench tokens sweep" "${PREFIX}_bench_tokens.log" "${BENCH[@]}" --workload wt103-base \
        --tokens 1024,4096,16384,65536 --corpus "$CORPUS" --modes train,inference --providers "$FAST" \
        --csv "${PREFIX}_tokens.csv"
    step "bench vocab sweep" "${PREFIX}_bench_vocab.log" "${BENCH[@]}" --workload wt103-base \
        --vocab 10000,33278,100000,267735,1000000 --tokens 16384 --modes train --providers "$FAST" \
        --csv "${PREFIX}_vocab.csv"
fi
step "plots (all GPU CSVs)" "${PREFIX}_plots.log" "$PY" -m bench.plot "${PREFIX}_main.csv" "${PREFIX}_tokens.csv" \
    "${PREFIX}_vocab.csv" --out "$RESULTS" --prefix "$(basename "$PREFIX")_all"

echo; echo "=== gpu_check summary ($(basename "$PREFIX"))"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
