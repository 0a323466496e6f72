"""Small PCAM-format datasets for tests, made with the pipeline's own writers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pcam_pipeline.data.hdf5 import write_pcam_split
from pcam_pipeline.data.pcam import SPLITS, split_files
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.data.writers import ProcessedLayout, ProcessedWriter

N = 300  # not a multiple of the block or chunk: partial last block and chunk


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


def stamped_patches(n: int, seed: int = 0) -> np.ndarray:
    """Random patches whose top-left pixel spells their index: batches can be decoded."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    index = np.arange(n)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = index & 0xFF, index >> 8
    return x


def write_processed(path: Path, n: int = N, chunk: int = 32, compression: str = "none") -> Path:
    x = stamped_patches(n)
    y = (np.arange(n) % 3 == 0).astype(np.uint8)
    with ProcessedWriter(path, ProcessedLayout(chunk, compression)) as writer:
        for start in range(0, n, 100):  # appended in blocks, as preprocess does
            stop = min(start + 100, n)
            writer.append(x[start:stop], y[start:stop], np.arange(start, stop))
    return path


def write_corrupt_chunk(
    path: Path, key: str, data: np.ndarray, chunk_rows: int, bad_chunk: int
) -> None:
    """Write `data` under `key`, gzip-compressed in chunks of `chunk_rows` rows, then invert bytes
    in the middle of chunk number `bad_chunk` on disk (bit rot, a bad sector): the file opens,
    but h5py raises OSError reading those rows. The chunk's file offset comes from HDF5 itself,
    so the damage always lands in its compressed data."""
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            key, data=data, chunks=(chunk_rows, *data.shape[1:]), compression="gzip"
        )
        infos = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
    [info] = [i for i in infos if i.chunk_offset[0] == bad_chunk * chunk_rows]
    start, length = info.byte_offset + info.size // 4, max(1, info.size // 2)
    with open(path, "r+b") as handle:
        handle.seek(start)
        damaged = bytes(255 - byte for byte in handle.read(length))
        handle.seek(start)
        handle.write(damaged)


# Planting bad data in one split's files, and finding what validate made of it.


def set_x(pcam: Path, split: str, change) -> None:
    x, _ = read(pcam, split)
    rewrite(pcam, split, "x", "x", change(x))


def set_y(pcam: Path, split: str, change) -> None:
    _, y = read(pcam, split)
    rewrite(pcam, split, "y", "y", change(y))


def with_value(array: np.ndarray, dtype, index: tuple, value) -> np.ndarray:
    changed = array.astype(dtype)
    changed[index] = value
    return changed


def problems(report: dict, check: str) -> list[dict]:
    """The problems of one check in a validate report."""
    return [p for p in report["problems"] if p["check"] == check]
