"""Where a stage runs: the processed-data directory, the torch device and its precision.

Shared by train, evaluate, benchmark and `pcam predict`, so that none of them imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pcam_pipeline.paths import PROCESSED_DIR, TRAIN_DATA_DIR_ENV


def data_dir() -> Path:
    """The processed splits: node-local staging when PCAM_TRAIN_DATA_DIR is set, else the repo's."""
    return Path(os.environ.get(TRAIN_DATA_DIR_ENV, PROCESSED_DIR))


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
