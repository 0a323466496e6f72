"""Small PCAM-format datasets for tests, made with the pipeline's own writers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pcam_pipeline.data.hdf5 import write_pcam_split
from pcam_pipeline.data.pcam import SPLITS, split_files
from pcam_pipeline.data.synthetic import generate_split


def make_pcam_dir(directory: Path, sizes: dict[str, int] | None = None, seed: int = 7) -> Path:
    sizes = sizes or {"train": 64, "valid": 32, "test": 32}
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        x, y = generate_split(seed, split, sizes[split], 0.5)
        write_pcam_split(directory, split, x, y)
    return directory


def rewrite(directory: Path, split: str, part: str, key: str, data: np.ndarray) -> Path:
    """Replace one PCAM file's dataset, e.g. to plant bad data."""
    path = split_files(directory, split)[0 if part == "x" else 1]
    with h5py.File(path, "w") as handle:
        handle.create_dataset(key, data=data)
    return path


def read(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = split_files(directory, split)
    with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
        return fx["x"][...], fy["y"][...]
