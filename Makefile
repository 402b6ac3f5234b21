# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment, install the packages (torch pinned to the local CPU wheel) and
# fetch the corpus; the second time they only check stamps and go straight to work.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed
CORPUS := data/corpus/python_docs.jsonl
PYTEST_ARGS ?=
# pytest-xdist workers: 3 on 2 cores, because most long tests wait on subprocesses (Slurm jobs, torchrun
# worlds, a collective time-out) rather than compute; whole files per worker (module fixtures are shared).
PYTEST_WORKERS ?= 3
XDIST  := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup corpus demo test test-fast bench bench-real gpu-wheels gpu-check slurm-up clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	@echo "== set-up: virtual environment in $(VENV) (torch==2.13.0, CPU)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	@touch $@

setup: $(STAMP)  ## virtual environment and packages

$(CORPUS): scripts/get_corpus.py
	@echo "== set-up: demo corpus (Python 3.11 documentation, from Debian's python3.11-doc)"
	$(PYTHON) scripts/get_corpus.py --out $(CORPUS)

corpus: $(CORPUS)  ## the demo corpus

demo: setup corpus  ## train a tiny LoopMoE on the CPU, export it and print a sample
	@bash scripts/demo.sh

test: setup corpus  ## the test suite (CPU)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup corpus  ## the test suite without the slow tests
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# A Megatron-LM checkout at tag core_v0.16.1 (outside the repository), for bench/preprocess.py.
MEGATRON_LM ?= /tmp/megatron-lm
bench: setup corpus  ## benchmarks; results go to docs/benchmarks/
	$(PY) bench/preprocess.py --megatron-lm $(MEGATRON_LM)
	$(PY) bench/model_step.py
	$(PY) bench/real_shapes.py --profile

bench-real: setup  ## the real-shape benchmark only (LoopMoE-3B/9B layer shapes; docs/benchmarks/real_shapes.md)
	$(PY) bench/real_shapes.py --profile

gpu-wheels:  ## download/build the wheels gpu-check installs offline (megatron-core, DeepSpeed, deps) into wheels/
	bash scripts/gpu_wheels.sh

gpu-check:  ## on a GPU machine (CUDA torch, no network): the real trainer with save/resume, bf16 + FP8, MFU, syncs -> docs/benchmarks/gpu.md (dry run: bench/gpu_check.py --print-commands)
	bash scripts/gpu_check.sh

slurm-up:  ## start a one-node Slurm cluster on localhost for the Slurm tests (root; Debian packages)
	bash scripts/slurm_up.sh

clean:  ## remove the virtual environment and generated data
	rm -rf $(VENV) data runs
