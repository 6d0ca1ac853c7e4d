# Set-up and the two everyday commands. Needs only Python 3.11 on the PATH.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint docs check install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	# Anything that depends on torch (lightning, trl) must have left the CPU build in place.
	$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'pip replaced torch 2.13.0 with {v}'"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rampup demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Ruff (lint and format) and mypy, as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/scripts
	$(BIN)/ruff format --check src tests benchmarks docs/scripts
	$(BIN)/mypy

# The manual, into site/; --strict fails on a broken link or a docstring mkdocstrings cannot read.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# What CI runs: the checks, the docs, then the whole suite.
check: lint docs test

clean:
	rm -rf $(VENV) .rampup_cache runs site
