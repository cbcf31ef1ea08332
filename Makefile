# Set-up and everyday commands. `make demo` and `make test` do all set-up on a fresh machine
# (Python 3.10+ and make): a virtual environment in .venv with the CPU build of torch, and, for
# the tests, the machine's tools they drive (tests/tools/require.sh: installed from Debian's
# packages when run as root, else named in one line).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (an unpinned torch would pull several GB of CUDA packages).
TORCH ?= torch==2.13.0

.PHONY: setup tools demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null; \
	  else echo "$(PYTHON) cannot make virtual environments: install python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e '.[dev]'
	touch $@

tools:
	@PYTHON="$(PYTHON)" tests/tools/require.sh

demo: setup
	$(BIN)/ringwatch demo

test: setup tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) ringwatch-logs ringwatch-demo .pytest_cache
