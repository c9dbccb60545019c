# Command index. `make bench` and `make test` do all set-up themselves (a .venv in the repo).
# On a machine with a GPU, pick the torch build with e.g. TORCH_SPEC="torch==2.13.0".
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test fuzz mutate bench bench-suite lm-quick gpu-check clean

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

# nightly-style fuzz: the hypothesis "long" profile (20x the CI examples, random seeds)
fuzz: $(STAMP)
	DEFINE_KERNELS_FUZZ_PROFILE=long $(PY) -m pytest python_tests/test_fuzz.py python_tests/test_fuzz_module.py python_tests/test_fuzz_bad_inputs.py -q -p no:cacheprovider

# plant each bug of tools/mutations.py in a scratch copy; report in bench/results/mutation_<date>.md
mutate: $(STAMP)
	$(PY) -m tools.mutate

bench: $(STAMP)
	$(PY) -m bench.run

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
