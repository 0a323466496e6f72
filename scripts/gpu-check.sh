#!/usr/bin/env bash
# The GPU loop benchmark (python -m pcam_pipeline.perf.gpu_loop), one command on a GPU node (a
# few minutes; not slurm/gpu-check.py, the jobs' CUDA preflight): a PCAM-sized split through
# validate and preprocess, the training loop end to end against the same step on resident data
# (batch size x precision x train.compile), the same for timm's resnet18 and resnet50 at batch
# 256 bf16, eager and compiled (`--no-timm` in PCAM_GPU_CHECK_ARGS skips them), then the CUDA
# tests (`pytest -m gpu`). timm must be installed for its rows (an error row says so otherwise).
#
#   scripts/gpu-check.sh [OUT_DIR]          # default reports/gpu-check
#   PCAM_BASELINE=DIR scripts/gpu-check.sh  # also time an earlier checkout's loop beside it
#   PCAM_GPU_CHECK_ARGS=--mig-cap scripts/gpu-check.sh reports/gpu-check-mig
#       # the course's MIG 1g.5gb slice, stood in for: the process capped at 4.75 GiB, the CNN and
#       # timm resnet18 at batch 1/64/256/1024, eager and compiled: fits, img/s, peak memory
#
# Needs python3 with torch (CUDA), h5py, numpy, scipy, scikit-learn, pydantic, pyyaml, tqdm,
# psutil and pytest; not DVC (the stages' functions are called directly).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-reports/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
baseline=()
[[ -n "${PCAM_BASELINE:-}" ]] && baseline=(--baseline "$PCAM_BASELINE")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
nvidia-smi -L | tee -a "$out/nvidia-smi.txt" # GPUs and MIG instances (a slice's profile)
python3 -m pcam_pipeline.perf.gpu_loop --out "$out/gpu-check.json" "${baseline[@]}" \
  ${PCAM_GPU_CHECK_ARGS:-} | tee "$out/gpu-check.txt"
python3 -m pytest -m gpu -p no:cacheprovider -q -rs tests/train/test_gpu.py 2>&1 \
  | tee "$out/gpu-tests.txt"
