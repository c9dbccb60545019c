#!/usr/bin/env bash
# CI without a GPU: prove the GPU build against a CUDA build of torch.
#   1. a second venv (.venv-cuda) with `pip install torch==2.14.1 ninja numpy pytest` (local disk);
#   2. the JIT build of the whole extension, CUDA kernels and binding included
#      (python -m define_kernels.build --require-cuda), and the CMake CUDA configure + build,
#      the two in parallel (one compile job each); both .so files are then loaded (dlopen needs
#      no GPU) and must register CUDA kernels;
#   3. the Triton kernels compiled for sm_90a (GPUTarget cuda/90) in bf16, fp16 and fp32: at
#      wt103-base every forward autotune config and every backward kernel of each dtype; at the
#      other standard workloads each dtype's pinned forward tile and the bf16 backward of their
#      layer shapes; the LM-head loss's two Triton kernels at their launch tiles, every dtype,
#      plain CE and augmented + bias (bench/resource_lm_head.py, about 10 s);
#      the CUDA kernels (every csrc/cuda/*.cu, every dtype) for sm_90 (what the
#      build ships for H100/H200; sm_90a gives the same resources and is in the full report);
#      into a resource report, and python_tests/test_cuda_compile.py (toolkit discovery + the
#      resource gate, which also checks that every dtype is covered) on it. The full report
#      (every dtype, config and workload) is `make resource-report`.
# Each stage prints its wall time and load. Env: CUDA_TORCH_SPEC (default torch==2.14.1), CUDA_VENV
# (default .venv-cuda, reused when present), CUDA_CHECK_DIR (default build/cuda-check),
# CUDA_CHECK_GATE=0 to report the gate without failing on it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
VENV="${CUDA_VENV:-$REPO/.venv-cuda}"
WORK="${CUDA_CHECK_DIR:-$REPO/build/cuda-check}"
PY="$VENV/bin/python"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
# a fresh Triton cache: every kernel really compiles (and is timed) as on a new CI machine
export TRITON_CACHE_DIR="$WORK/triton_cache"
unset DEFINE_KERNELS_LIB DEFINE_KERNELS_NO_JIT
TOTAL_START=$SECONDS
# each stage prints its wall time and the 1-minute load average at its end (shared CI machines:
# a time means little without the load it was measured under)
stage() { echo; echo "=== cuda_build_check: $1"; STAGE_START=$SECONDS; }
done_stage() { echo "=== cuda_build_check: $1 took $((SECONDS - STAGE_START)) s (load $(cut -d' ' -f1 /proc/loadavg))"; }

stage "venv with $SPEC"
if [[ ! -x "$PY" ]] || ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # (--no-compile: bytecode only for what is imported; pip's notes about unreadable mirror
    # locations are dropped, errors still show)
    "$PY" -m pip install --quiet --no-compile "$SPEC" ninja numpy pytest 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)'
done_stage "venv"

rm -rf "$WORK"; mkdir -p "$WORK"
stage "JIT build and CMake build (in parallel)"
( "$PY" -m define_kernels.build --require-cuda > "$WORK/jit.log" 2>&1; echo $? > "$WORK/jit.rc" ) &
JIT_PID=$!
GENERATOR=(); command -v ninja >/dev/null || [[ -x "$VENV/bin/ninja" ]] && GENERATOR=(-G Ninja)
( export PATH="$VENV/bin:$PATH"
  { cmake -S "$REPO" -B "$WORK/cmake" "${GENERATOR[@]}" -DPython3_EXECUTABLE="$PY" \
    && cmake --build "$WORK/cmake" -j1; } > "$WORK/cmake.log" 2>&1; echo $? > "$WORK/cmake.rc" ) &
CMAKE_PID=$!
wait $JIT_PID $CMAKE_PID || true
echo "--- JIT build (exit $(cat "$WORK/jit.rc"))"; grep -v '^W[0-9]' "$WORK/jit.log" | tail -n 12
echo "--- CMake (exit $(cat "$WORK/cmake.rc"))"; grep -E 'define_kernels_C:|error|Error' "$WORK/cmake.log" | head -n 20 || true
[[ "$(cat "$WORK/jit.rc")" == 0 && "$(cat "$WORK/cmake.rc")" == 0 ]] || { echo "cuda_build_check: build failed"; exit 1; }
done_stage "builds"

stage "load both libraries (no GPU needed)"
JIT_SO="$(sed -n 's/^define_kernels_C loaded from //p' "$WORK/jit.log")"
for SO in "$JIT_SO" "$WORK/cmake/libdefine_kernels_C.so"; do
    "$PY" - "$SO" <<'PYCODE'
import sys, torch
torch.ops.load_library(sys.argv[1])
for key in ("CPU", "CUDA"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("define_kernels_C::hgt_forward", key), (sys.argv[1], key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("define_kernels_C::hgt_backward", key), (sys.argv[1], key)
print("loaded with CPU and CUDA kernels:", sys.argv[1])
PYCODE
done
done_stage "load"

stage "Triton for sm_90a + CUDA for sm_90: resource report"
# CI subset (the full report is `make resource-report`, committed in bench/results/): every dtype;
# every forward autotune config and backward kernel at wt103-base; elsewhere the pinned forward
# tile per dtype and the bf16 backward (fp16's backward kernels are bf16's tiles in another
# 16-bit type; all three dtypes were +135 s, this subset +73 s, on the shared 2-core machine);
# CUDA: every csrc/cuda/*.cu for sm_90; lm_head: both LM-head kernels (the default --backends).
"$PY" -m bench.resource_report --out "$WORK" --stem resource --dtypes bfloat16,float16,float32 \
    --all-configs-workloads wt103-base --backward-everywhere-for bfloat16 --cuda-archs sm_90
done_stage "resource report"

stage "toolkit + resource gate tests"
GATE_ARGS=(); [[ "${CUDA_CHECK_GATE:-1}" == 0 ]] && GATE_ARGS=(-k "not gate")
DEFINE_RESOURCE_REPORT="$WORK/resource.csv" "$PY" -m pytest python_tests/test_cuda_compile.py -q -rs \
    -p no:cacheprovider "${GATE_ARGS[@]}"
done_stage "tests"
echo "=== cuda_build_check: all stages passed in $((SECONDS - TOTAL_START)) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
