"""Where a measurement ran, recorded one way for the benchmark stage and the GPU loop benchmark: the
library builds, the GPU and its driver, the CPU and its numerics, memory and load, and the
container and job (`repro.run_environment`, which the checkpoints' provenance records too)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import psutil
import torch

from pcam_pipeline import numerics
from pcam_pipeline.repro import run_environment
from pcam_pipeline.runtime import cpu_numerics_record, gpu_record


def gpu_driver() -> dict[str, str | None]:
    """The NVIDIA driver and GPU memory as nvidia-smi reports them (None where it cannot)."""
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        driver, memory = (part.strip() for part in smi.stdout.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"driver": None, "gpu_memory": None}
    return {"driver": driver, "gpu_memory": memory}


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        # Whole GPU or MIG slice, and the slice's profile (nvidia-smi -L, CUDA_VISIBLE_DEVICES).
        "gpu_mig": gpu_record(ask_smi=True) if cuda else None,
        **(gpu_driver() if cuda else {"driver": None, "gpu_memory": None}),
        "cpu_model": numerics.cpu_identity()["model"],
        "cpu_numerics": cpu_numerics_record(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "memory_total_gb": psutil.virtual_memory().total / 1e9,
        "load_average_1m": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **run_environment(),
    }
