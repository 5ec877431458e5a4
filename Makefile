# One entry point that works from a fresh clone: every target builds the venv it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
GRPC_PORT ?= 8001
ARTIFACTS ?= artifacts/default

.PHONY: install test serve lint default-models bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch comes from local disk; other specs would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

default-models: install
	$(PY) -m training default-models --out checkpoints/default
