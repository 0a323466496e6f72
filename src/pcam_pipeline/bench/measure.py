"""Measurement helpers that need no torch: one median, one rate, one peak-memory reader, and
reads of a dataset's bytes (cold or warm), the upper bound every design is compared with.

Torch-free so that the child processes measuring validate and preprocess carry no more memory
than those stages do.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from pcam_pipeline.data.hdf5 import blocks
from pcam_pipeline.data.reader import PatchBlocks

PCAM_TRAIN_PATCHES = 262_144  # one epoch of the real PCAM train split


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: after fork + exec, Linux
    carries the parent's peak over into the child's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evict(path: Path) -> bool:
    """Drop one file's pages from the page cache (only that file's; needs clean pages)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_seconds(path: Path, block: int, key: str = "x") -> tuple[float, int, bool]:
    """Seconds to read every row of `key` in consecutive blocks into one reused buffer; the row
    count; whether the rows were read with pread (else through h5py)."""
    with PatchBlocks(path, key) as reader:
        buffer = np.empty((block, *reader.row_shape), dtype=reader.dtype)
        start = time.perf_counter()
        for part in blocks(reader.length, block):
            reader.read_into(buffer, part.start, part.stop)
        return time.perf_counter() - start, reader.length, reader.direct


def copy_seconds(path: Path, target: Path, block: int, key: str = "x") -> tuple[float, int]:
    """Seconds to read every row of `key` in blocks and write the bytes to a new file `target`:
    the least I/O a stage that writes its input back out must do (not synced: nor are stages)."""
    with PatchBlocks(path, key) as reader:
        buffer = np.empty((block, *reader.row_shape), dtype=reader.dtype)
        start = time.perf_counter()
        with open(target, "wb") as out:
            for part in blocks(reader.length, block):
                out.write(memoryview(reader.read_into(buffer, part.start, part.stop)).cast("B"))
        seconds = time.perf_counter() - start
    target.unlink()
    return seconds, reader.length
