"""HDF5 reading and writing: the PCAM layout in, the training layout out, always atomically."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.pcam import LABEL_SHAPE, PATCH_SHAPE, split_files
from pcam_pipeline.repro import atomic_path


def write_pcam_split(directory: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write one split as the two PCAM files (`x`: (N,96,96,3) uint8, `y`: (N,1,1,1) uint8)."""
    x_path, y_path = split_files(directory, split)
    with atomic_path(x_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("x", data=x)
    with atomic_path(y_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("y", data=y.reshape(-1, *LABEL_SHAPE))


def blocks(length: int, block: int) -> Iterator[slice]:
    for start in range(0, length, block):
        yield slice(start, min(start + block, length))


@dataclass(frozen=True)
class ProcessedLayout:
    chunk_patches: int
    compression: str  # none | lzf | gzip

    def dataset_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"chunks": (self.chunk_patches, *PATCH_SHAPE)}
        if self.compression != "none":
            options["compression"] = self.compression
        return options


class ProcessedWriter:
    """Appends blocks of patches to a training-layout file, renamed into place on close.

    Layout: `x` (N,96,96,3) uint8 chunked by whole patches, `y` (N,) uint8 and `index` (N,) int64
    (each patch's index in the source PCAM split, so a result can be traced to its input).
    """

    def __init__(self, path: Path, layout: ProcessedLayout) -> None:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._file = self._stack.enter_context(h5py.File(tmp, "w"))
        self._x = self._file.create_dataset(
            "x", shape=(0, *PATCH_SHAPE), maxshape=(None, *PATCH_SHAPE), dtype="uint8",
            **layout.dataset_options(),
        )
        self._y = self._file.create_dataset("y", shape=(0,), maxshape=(None,), dtype="uint8")
        self._index = self._file.create_dataset(
            "index", shape=(0,), maxshape=(None,), dtype="int64"
        )
        self.count = 0

    def append(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        start, stop = self.count, self.count + len(x)
        for dataset, values in ((self._x, x), (self._y, y), (self._index, index)):
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values
        self.count = stop

    def __enter__(self) -> ProcessedWriter:
        return self

    def __exit__(self, *exc_info: object) -> bool | None:
        return self._stack.__exit__(*exc_info)


def read_processed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Whole split into memory: (x uint8 (N,96,96,3), y uint8 (N,))."""
    with h5py.File(path, "r") as handle:
        return handle["x"][...], handle["y"][...]


def processed_length(path: Path) -> int:
    with h5py.File(path, "r") as handle:
        return int(handle["y"].shape[0])
