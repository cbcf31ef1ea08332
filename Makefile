# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (an unpinned torch would pull several GB of CUDA packages).
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/ringwatch demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) ringwatch-logs ringwatch-demo .pytest_cache
