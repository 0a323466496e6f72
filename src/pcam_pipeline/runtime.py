"""Where a stage runs: the processed-data directory, the torch device and its precision.

Shared by train, evaluate, benchmark and `pcam predict`, so that none of them imports another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline import numerics
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.paths import PROCESSED_DIR, TRAIN_DATA_DIR_ENV


def data_dir() -> Path:
    """The processed splits: node-local staging when PCAM_TRAIN_DATA_DIR is set, else the repo's."""
    return Path(os.environ.get(TRAIN_DATA_DIR_ENV, PROCESSED_DIR))


def processed_data() -> ProcessedData:
    """The processed dataset this stage reads (in `data_dir`)."""
    return ProcessedData(data_dir())


def resolve_device(choice: str) -> torch.device:
    """`auto` | `cpu` | `cuda` as a device; asking for CUDA where there is none is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device is 'cuda' but no CUDA device is visible; "
            "use 'auto' or 'cpu', or run on a GPU node (`--gpus=1`)"
        )
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def uses_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast only on CUDA: on the CPU it is slower and changes the numbers."""
    return requested and device.type == "cuda"


def uses_channels_last(device: torch.device) -> bool:
    """channels_last feeds cuDNN's fastest convolutions; on the CPU it buys nothing."""
    return device.type == "cuda"


def cpu_numerics_record() -> dict[str, Any]:
    """What decided this process's CPU numbers, for a provenance record: the numerics mode and
    the level the libraries run at, the CPU, and the thread count.

    The vendor and model are what the operating system reports (/proc/cpuinfo: the host's,
    under qemu-user); `vector_extensions` are what the CPU itself answers (CPUID, via NumPy).
    """
    identity = numerics.cpu_identity()
    return {
        "numerics": numerics.active(),
        "level": numerics.level(identity),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": identity["vendor"],
        "cpu_model": identity["model"],
        "vector_extensions": vector_extensions(),
        "torch_threads": torch.get_num_threads(),
        "environment": {name: os.environ.get(name) for name in numerics.PORTABLE_ENV},
    }


def vector_extensions() -> list[str]:
    """The vector extensions the CPU reports (CPUID) among those that change kernel choice."""
    from numpy._core._multiarray_umath import __cpu_features__

    return [name for name in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX") if __cpu_features__[name]]
