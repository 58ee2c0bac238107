# Two commands for a newcomer on a fresh machine:
#   make demo   set up .venv and train the built-in tiny model end to end (offline, CPU, ~1 minute)
#   make test   set up .venv and run the test suite (offline, CPU, 5-10 minutes on 2 cores; it builds the docs site too)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $@

demo: setup
	rm -rf runs/tiny-demo
	$(BIN)/llama-ft sft recipes/tiny.yaml --output-dir runs/tiny-demo

# One thread per process and one test process per core (pytest-xdist; a file's tests stay on one worker so its
# fixtures are built once): the tiny model's ops are too small to share a core, and with 2 threads per process a
# 40-step sft took 16 s once and 107 s the next time (13.6-13.8 s with one). The suite's time: docs/contributing.md.
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

bench: setup
	$(BIN)/python benchmarks/sft_throughput.py
