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

.PHONY: setup run test test-fast lint image sif s3-up s3-down slurm-up slurm-down clean-venv \
	lock lock-check image-plan image-repro-check image-push apptainer-install sif-registry sif-push \
	workflow-lint ci-test ci-runner-disk coverage pr-report pr-comment data-check data-report \
	data-comment model-get

# Image variant (cpu | cu130 | ...): which lock the image installs (containers/build.sh).
TORCH_VARIANT ?= cpu
export TORCH_VARIANT

# On Linux x86_64 the venv takes PyPI's torch (its CUDA 13.0 build, which runs on the CPU, with the
# NVIDIA wheels pinned in requirements-cu130.lock): PyPI's torchvision, which timm needs, is built
# against it and does not import beside a +cpu torch (docs/development.md, 'The torch build').
TORCH_BUILD_LOCK := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),requirements-cu130.lock)

# Exactly the locks' files, each checked against the sha256 the lock names (pip --require-hashes
# --no-deps): a file the locks do not name is refused, naming the package and the fix (make lock).
# The torch build lock comes first: its torch=== wins over the runtime lock's torch==.
INSTALL_LOCKS := containers/install-lock.sh $(BIN)/python $(TORCH_BUILD_LOCK) requirements.lock

$(STAMP): requirements.lock requirements-runtime.lock $(TORCH_BUILD_LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(INSTALL_LOCKS)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

setup: $(STAMP)  ## create .venv from requirements.lock (exact pins) + this package

run: $(STAMP)  ## the whole pipeline on the embedded default: dvc repro
	dvc repro

test: $(STAMP)  ## the whole test suite (integration tests start their own services)
	pytest

test-fast: $(STAMP)  ## everything but the heavy integration tests
	pytest -m "not heavy"

# The fast set's line coverage of src/pcam_pipeline; below COVERAGE_MIN it fails (the pull-request
# workflow runs this target). Measured 82 % on 2026-12-06 (README); code the tests run as `pcam`
# subprocesses is not counted.
COVERAGE_MIN ?= 82
COVERAGE_TESTS ?=
coverage: $(STAMP)  ## the fast tests with coverage: prints the figure, fails under COVERAGE_MIN
	pytest -m "not heavy" --cov=pcam_pipeline --cov-report=term --cov-fail-under=$(COVERAGE_MIN) $(COVERAGE_TESTS)

# The pull request's review loop (.github/workflows/pr.yml; docs/review.md). No $(STAMP): they run
# after `make run`, and in tests inside copies of the project that have no .venv of their own.
PCAM_REPORT_BASE ?= HEAD
PCAM_REPORT_FILE ?= reports/compare/report.md
pr-report:  ## pcam report $$PCAM_REPORT_BASE: params, metrics, plots offline in reports/compare/
	pcam report $(PCAM_REPORT_BASE)

pr-comment:  ## post that report on the pull request: one comment, edited on later pushes (gh)
	scripts/pr-comment.sh $(PCAM_REPORT_FILE)

# The registry workflow (.github/workflows/registry.yml): a GTO tag of the model fetched and checked.
PCAM_MODEL_TAG ?=
model-get: $(STAMP)  ## pcam model-get $$PCAM_MODEL_TAG: checkpoint + export into build/model, md5-checked
	@test -n "$(PCAM_MODEL_TAG)" || { echo "make model-get: set PCAM_MODEL_TAG (e.g. pcam-classifier@v1.2.0)" >&2; exit 2; }
	pcam model-get '$(PCAM_MODEL_TAG)' --out build/model

# The data-change workflow (.github/workflows/data.yml): validate and preprocess again, then the
# dataset against the base as a comment of its own. With S3 credentials the pinned raw data is
# pulled from the DVC remote first (docs/remote.md); without, the embedded default is used.
data-check: $(STAMP)  ## dvc repro preprocess (after dvc pull data.dvc when AWS credentials are set)
	@if [ -n "$${AWS_ACCESS_KEY_ID:-}" ]; then echo "dvc pull data.dvc"; dvc pull data.dvc; fi
	dvc repro preprocess

data-report:  ## pcam data-report $$PCAM_REPORT_BASE: data params, validate, preprocess -> data.md
	pcam data-report $(PCAM_REPORT_BASE)

PCAM_DATA_REPORT_FILE ?= reports/compare/data.md
data-comment:  ## post that report on the pull request: a comment of its own, edited on later pushes
	PCAM_COMMENT_MARKER='<!-- pcam-data -->' scripts/pr-comment.sh $(PCAM_DATA_REPORT_FILE)

lint: $(STAMP)  ## the pre-commit hooks on every file
	pre-commit run --all-files

clean-venv:
	rm -rf $(VENV)

image:  ## container image pcam-pipeline:$TORCH_VARIANT (docker or podman; docs/containers.md)
	containers/build.sh image

image-plan:  ## print the build command `make image` runs for $TORCH_VARIANT (no build)
	containers/build.sh plan

sif:  ## Apptainer image pcam.sif from that image (needs apptainer; docs/containers.md)
	containers/build.sh sif

# --- the locked environment (docs/development.md, 'Updating dependencies') ---------------------------
# uv pip compile --generate-hashes against PyPI, the existing pins held (UPGRADE="NAME ..." lets
# those move); same inputs, same bytes.
UPGRADE ?=
lock: $(STAMP)  ## the four locks, hashed, from pyproject.toml (existing pins kept; UPGRADE=NAME moves one)
	$(BIN)/python containers/lock.py lock $(addprefix --upgrade=,$(UPGRADE))

lock-check: $(STAMP)  ## the locks agree with pyproject.toml and each other, every pin hashed, as make lock writes them
	$(BIN)/python containers/lock.py check --resolve
	$(BIN)/python containers/lock.py check-cuda requirements-cu130.lock

lock-cu%: $(STAMP)  ## requirements-cuXXX.lock: torch's CUDA build from the PyTorch index, hashed (cu130: make lock)
	$(BIN)/python containers/lock.py cuda cu$*

# --- what CI does (.github/workflows/images.yml; containers/publish.sh) -----------------------------
ci-test:  ## CI's test step: `make test` with integration tests required (.ci/run)
	bash .ci/run

ci-runner-disk:  ## GitHub runner only: free disk for the CUDA image and the SIF
	containers/publish.sh runner-disk

image-repro-check:  ## dvc repro inside the image on a fresh clone; fails if dvc.lock differs
	containers/publish.sh repro-check

image-push:  ## tag the image by commit (+ version on a v* tag) and push it to $PCAM_REGISTRY
	containers/publish.sh push

apptainer-install:  ## Apptainer on the CI runner (Ubuntu PPA)
	containers/publish.sh install-apptainer

sif-registry:  ## pcam.sif from the pushed image (def file's sections kept), then apptainer test
	containers/publish.sh sif

sif-push:  ## push pcam.sif as an ORAS artifact: apptainer pull oras://.../pcam-pipeline-sif:TAG
	containers/publish.sh sif-push

workflow-lint: $(STAMP)  ## actionlint on .github/workflows (offline; also a pre-commit hook)
	$(BIN)/actionlint

s3-up:  ## a local S3 server (moto) on 127.0.0.1:5555, bucket pcam-dvc, to try the DVC remote
	scripts/s3-server.py start --port 5555 --bucket pcam-dvc

s3-down:  ## stop it (by its PID)
	scripts/s3-server.py stop --port 5555

slurm-up:  ## one-node Slurm on this machine (root); then: eval "$$(slurm/local-cluster.sh env)"
	slurm/local-cluster.sh install
	slurm/local-cluster.sh start

slurm-down:  ## stop the local Slurm
	slurm/local-cluster.sh stop

# --- the documentation site (mkdocs.yml; docs/development.md) ---------------------------------------
.PHONY: docs docs-reference docs-check
docs: $(STAMP)  ## the site in build/site: reference pages, README + docs/, mkdocs build --strict
	$(BIN)/python -m pcam_pipeline.review.site build

docs-reference: $(STAMP)  ## rewrite docs/reference/{params,cli}.md from params.py, params.yaml, cli
	$(BIN)/python -m pcam_pipeline.review.site reference

docs-check: $(STAMP)  ## fail if docs/reference/ differs from what the code gives (also a test)
	$(BIN)/python -m pcam_pipeline.review.site check
