"""What the HDF5 modules here share, and the PCAM files written (fetch's synthetic source).

The training layout's writers are in `writers.py`, the block reader in `reader.py`, the threaded
pass over a file's blocks in `block_scan.py`: each stage imports only the ones it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from pcam_pipeline.data.pcam import LABEL_SHAPE, split_files
from pcam_pipeline.repro import atomic_path

# HDF5's own bytes beside the data, at most: fetch's and preprocess's free-space checks add it to
# each file (`writers.ProcessedLayout.max_file_bytes` has the measurements).
HDF5_METADATA_BYTES = 1 << 20


def write_pcam_split(directory: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write one split as the two PCAM files (`x`: (N,96,96,3) uint8, `y`: (N,1,1,1) uint8).

    Through HDF5's own driver, not `writers.NewHDF5`: for these contiguous datasets the two lay the
    file out differently, and these bytes are pinned in dvc.lock (fetch checks free space
    before it writes them)."""
    x_path, y_path = split_files(directory, split)
    with atomic_path(x_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("x", data=x)
    with atomic_path(y_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("y", data=y.reshape(-1, *LABEL_SHAPE))


def blocks(length: int, block: int) -> Iterator[slice]:
    for start in range(0, length, block):
        yield slice(start, min(start + block, length))
