# Command index. `make bench` and `make test` do all set-up themselves (a .venv in the repo).
# On a machine with a GPU, pick the torch build with e.g. TORCH_SPEC="torch==2.13.0".
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test fuzz mutate bench bench-lm-head bench-cpu-goals bench-cpu-profile bench-suite lm lm-plan lm-report lm-quick gpu-check gpu-check-dry-run cuda-build-check resource-report clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so nothing below resolves to a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench,hf]"
	touch $(STAMP)

venv: $(STAMP)

# The suite, then its skips checked against .ci/expected_skips.txt (an unexpected skip fails).
# CI sets DEFINE_KERNELS_EXPECT=cpu_cpp,triton so that those backends cannot silently skip.
test: $(STAMP)
	$(PY) -m pytest python_tests -q -rs -p no:cacheprovider --junitxml=$(VENV)/test-report.xml
	$(PY) .ci/check_skips.py $(VENV)/test-report.xml

# nightly-style fuzz: the hypothesis "long" profile (20x the CI examples, random seeds)
fuzz: $(STAMP)
	DEFINE_KERNELS_FUZZ_PROFILE=long $(PY) -m pytest python_tests/test_fuzz.py python_tests/test_fuzz_module.py python_tests/test_fuzz_bad_inputs.py -q -p no:cacheprovider

# plant each bug of tools/mutations.py in a scratch copy; report in bench/results/mutation_<date>.md
mutate: $(STAMP)
	$(PY) -m tools.mutate

bench: $(STAMP)
	$(PY) -m bench.run

# issue 9's CPU ratios side by side (wt103-base, 8,192 WikiText-2 ids), and the measured
# `auto` ranking (define_kernels/backends/measured_ranking.json) from the same run
bench-cpu-goals: $(STAMP)
	$(PY) -m bench.cpu_goals --rounds 5 --write-ranking

# the fused tied LM head vs TiedOutput + F.cross_entropy, chunked F.linear_cross_entropy and adaptive
# softmax, and a whole LM training step (fp32 + bf16, wt2-small + wt103-base, T = 4,096 + 8,192);
# cases that cannot fit in 0.8 x RAM are skipped and said so. About 1.5 h on 2 quiet cores.
bench-lm-head: $(STAMP)
	$(PY) -m bench.lm_head

# where a cpu_cpp step spends its time, per dtype (torch.profiler)
bench-cpu-profile: $(STAMP)
	$(PY) -m bench.cpu_profile

# pytest-benchmark suite at small sizes, for regression tracking
bench-suite: $(STAMP)
	$(PY) -m pytest bench/suite --benchmark-only -q -p no:cacheprovider

# LM quality suite (bench/lm/suite.py): 3 seeds x every variant x WikiText-2 and PTB, Transformer,
# fixed token budget per run; runs in the background (nohup), one run at a time, log in
# $(LM_DIR)/suite.log; rerun to resume (finished runs skipped, unfinished continue from their
# checkpoint). `make lm-plan` lists the runs and the estimated CPU time; `make lm-report` rewrites
# $(LM_DIR)/summary.md, summary.csv, verdicts.csv and summary.png from the finished runs.
LM_DIR ?= bench/results/lm_suite
LM_ARGS ?=
lm: $(STAMP)
	mkdir -p $(LM_DIR)
	nohup $(PY) -m bench.lm.suite --dir $(LM_DIR) $(LM_ARGS) >> $(LM_DIR)/suite.log 2>&1 < /dev/null & echo $$! > $(LM_DIR)/suite.pid
	@echo "LM suite started, pid $$(cat $(LM_DIR)/suite.pid); follow: tail -f $(LM_DIR)/suite.log"

lm-plan: $(STAMP)
	$(PY) -m bench.lm.suite --plan $(LM_ARGS)

lm-report: $(STAMP)
	$(PY) -m bench.lm.summary $(LM_DIR)

# CI smoke run of the suite: tiny Transformer, 30 steps, 1 seed, tied_unfused / tied / define on
# PTB, summary in a temporary folder (under a minute on 2 cores)
lm-quick: $(STAMP)
	$(PY) -m bench.lm.suite --quick

# GPU machine (torch + triton only, no network): build, correctness, memcheck, headline bench in
# <= 8 minutes with a budget per stage; results and summary in bench/results/ (or DEFINE_RESULTS_DIR).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

# CPU: the same stages' plumbing at tiny sizes (CI), results in a temporary directory
gpu-check-dry-run: $(STAMP)
	$(PY) -m bench.gpu_check --dry-run --out "$$(mktemp -d)"

# No GPU needed: a CUDA torch venv (.venv-cuda), JIT + CMake CUDA builds, sm_90a resource gate
cuda-build-check:
	bash .ci/cuda_build_check.sh

# Compile-time registers / spills / smem / occupancy / wgmma / scratch (needs a CUDA torch)
resource-report:
	$(or $(wildcard .venv-cuda/bin/python),$(GPU_PYTHON)) -m bench.resource_report

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info
