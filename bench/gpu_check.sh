#!/usr/bin/env bash
# Kept for old instructions: `make gpu-check` runs bench/gpu_check.py (stages with time budgets,
# summary even on failure). Python: $PYTHON, else python3 (the GPU machine's torch + triton).
cd "$(dirname "${BASH_SOURCE[0]}")/.." && exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
