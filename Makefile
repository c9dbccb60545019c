# Command index. `make bench` and `make test` do all set-up themselves (a .venv in the repo).
# On a machine with a GPU, pick the torch build with e.g. TORCH_SPEC="torch==2.13.0".
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test bench bench-cpu-goals bench-suite lm-quick gpu-check clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so nothing below resolves to a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest python_tests -q -rs -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m bench.run

# issue 9's CPU ratios side by side (wt103-base, 8,192 WikiText-2 ids), and the measured
# `auto` ranking (define_kernels/backends/measured_ranking.json) from the same run
bench-cpu-goals: $(STAMP)
	$(PY) -m bench.cpu_goals --rounds 5 --write-ranking

# pytest-benchmark suite at small sizes, for regression tracking
bench-suite: $(STAMP)
	$(PY) -m pytest bench/suite --benchmark-only -q -p no:cacheprovider

# LM quality benchmark, a few hundred steps of every variant on CPU
lm-quick: $(STAMP)
	$(PY) -m bench.lm.train --quick

# GPU machine: full CUDA/Triton test matrix + GPU benchmark rows into bench/results/
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
