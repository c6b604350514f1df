# Two commands for a newcomer:
#   make demo   set up .venv, then train + test TDAD on the embedded demo data (no download, no GPU)
#   make test   set up .venv, lint, then run the test suite (the command CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: an unpinned torch makes pip fetch a multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo lint test test-all

$(BIN)/.installed: pyproject.toml anomalib_tdad/anomalib_tdad_startup.pth
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,teachers]" $(TORCH)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/anomalib-tdad demo --output results/demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"
