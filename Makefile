# One entry point. `make run` and `make test` set up .venv from the pinned files when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test test-fast lint image sif clean-venv

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

setup: $(STAMP)  ## create .venv from requirements.lock (exact pins) + this package

run: $(STAMP)  ## the whole pipeline on the embedded default: dvc repro
	dvc repro

test: $(STAMP)  ## the whole test suite (integration tests start their own services)
	pytest

test-fast: $(STAMP)  ## everything but the heavy integration tests
	pytest -m "not heavy"

lint: $(STAMP)  ## the pre-commit hooks on every file
	pre-commit run --all-files

clean-venv:
	rm -rf $(VENV)
