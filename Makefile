# One entry point. `make run` and `make test` set up .venv from the pinned files when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
# Idle OpenMP threads sleep instead of spinning: on shared or oversubscribed cores spinning
# steals the CPU from the thread doing the work (see docs/performance.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test test-fast lint image sif s3-up s3-down slurm-up slurm-down clean-venv

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
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

image:  ## container image pcam-pipeline:$TORCH_VARIANT (docker or podman; docs/containers.md)
	containers/build.sh image

sif:  ## Apptainer image pcam.sif from that image (needs apptainer; docs/containers.md)
	containers/build.sh sif

s3-up:  ## a local S3 server (moto) on 127.0.0.1:5555, bucket pcam-dvc, to try the DVC remote
	scripts/s3-server.sh start --port 5555 --bucket pcam-dvc

s3-down:  ## stop it (by its PID)
	scripts/s3-server.sh stop --port 5555

slurm-up:  ## one-node Slurm on this machine (root); then: eval "$$(slurm/local-cluster.sh env)"
	slurm/local-cluster.sh install
	slurm/local-cluster.sh start

slurm-down:  ## stop the local Slurm
	slurm/local-cluster.sh stop
