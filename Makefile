# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aligntok-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint clean

# torch 2.13.0 CPU is served locally; a plain `torch` would pull a multi-GB CUDA build, so install the
# pinned CPU build first and only where no torch is importable (GPU users keep their own build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/aligntok assets fetch all
	$(BIN)/aligntok data fetch emoji fashion-mnist

demo: setup
	$(BIN)/aligntok demo

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

# One OpenMP thread: the suite is many small ops, and on a 2-core machine shared with any other job two
# spinning OpenMP threads per process made it 10-20x slower (docs/results.md, "Threads").
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
