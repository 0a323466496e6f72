"""The HDF5 layout of the processed splits: contiguous (written in order, its md5 computed as
it is written), and chunk size in patches x none/lzf/gzip, with its write time, file size, block
reads and our streaming loader, as a table (`python -m pcam_pipeline.perf layout`)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.bench.loaders import streaming_epoch
from pcam_pipeline.bench.measure import median, read_seconds
from pcam_pipeline.data.hdf5 import blocks
from pcam_pipeline.data.pcam import PATCH_BYTES, PATCH_SHAPE
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.data.writers import ProcessedLayout, open_writer
from pcam_pipeline.params import LoaderParams
from pcam_pipeline.paths import PROCESSED_DIR
from pcam_pipeline.repro import md5_file

log = logging.getLogger(__name__)
SOURCE_PATCHES = 2048  # distinct patches each layout's file is tiled from


def layout_source(patches: int) -> np.ndarray:
    """Up to SOURCE_PATCHES distinct patches: the processed train split if present, else
    synthetic."""
    train = ProcessedData(PROCESSED_DIR).split_path("train")
    count = min(patches, SOURCE_PATCHES)
    if train.exists():
        with h5py.File(train, "r") as handle:
            return handle["x"][:count]
    return generate_split(2026, "train", count, 0.5)[0]


def write_layout(
    path: Path, source: np.ndarray, patches: int, layout: ProcessedLayout
) -> tuple[float, float]:
    """Seconds to write `patches` patches (tiled from `source`) in `layout`, and seconds to know
    the file's md5 afterwards: 0 for contiguous (its writer computes it while writing, as
    preprocess does), else one read of the file from the page cache (what DVC would do)."""
    start = time.perf_counter()
    with open_writer(path, layout, patches, temporary=None, fix="free space") as writer:
        for part in blocks(patches, 1024):
            index = np.arange(part.start, part.stop)
            tiled = np.take(source, index % len(source), axis=0)
            writer.append(tiled, (index % 2).astype(np.uint8), index)
    written = time.perf_counter()
    if writer.md5 is None:
        md5_file(path)
    return written - start, time.perf_counter() - written


def shuffled_block_seconds(path: Path, patches: int, block: int, seed: int) -> float:
    """Seconds to read every block of `path` once, in a shuffled order."""
    order = np.random.default_rng(seed).permutation(-(-patches // block))
    with PatchBlocks(path) as reader:
        buffer = np.empty((block, *PATCH_SHAPE), dtype=np.uint8)
        start = time.perf_counter()
        for k in order:
            reader.read_into(buffer, k * block, min((k + 1) * block, patches))
        return time.perf_counter() - start


def measure_layout(
    source: np.ndarray,
    patches: int,
    layout: ProcessedLayout,
    directory: Path,
    block: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    path = directory / f"layout-{layout.storage}-{layout.chunk_patches}-{layout.compression}.h5"
    write_seconds, hash_seconds = write_layout(path, source, patches, layout)
    options = LoaderParams(
        in_memory=False,
        max_memory_fraction=0.5,
        block_patches=block,
        num_workers=0,
        device_memory_fraction=0.0,
    )
    sequential, shuffled, loader = [], [], []
    for repeat in range(repeats):
        sequential.append(patches / read_seconds(path, block)[0])
        shuffled.append(patches / shuffled_block_seconds(path, patches, block, repeat))
        start = time.perf_counter()
        seen = streaming_epoch(path, options, batch_size, repeat)
        loader.append(seen / (time.perf_counter() - start))
    size = path.stat().st_size
    path.unlink()
    return {
        "storage": layout.storage,
        "chunk_patches": None if layout.contiguous else layout.chunk_patches,
        "compression": layout.compression,
        "chunk_mb": None if layout.contiguous else layout.chunk_patches * PATCH_BYTES / 2**20,
        "size_ratio": size / (patches * PATCH_BYTES),
        "write_img_s": patches / write_seconds,
        "write_and_md5_img_s": patches / (write_seconds + hash_seconds),
        "sequential_read_img_s": median(sequential),
        "shuffled_block_read_img_s": median(shuffled),
        "loader_streaming_img_s": median(loader),
    }


def layout_table(
    patches: int,
    chunks: list[int],
    compressions: list[str],
    block: int,
    batch_size: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """The contiguous layout (when "none" is among `compressions`), then every chunk size with
    every compression."""
    source = layout_source(patches)
    layouts = [ProcessedLayout(chunks[0], "none", "contiguous")] if "none" in compressions else []
    layouts += [ProcessedLayout(c, compression) for compression in compressions for c in chunks]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pcam-layout-") as directory:
        for layout in layouts:
            log.info(
                "layout: %s, chunk %d, %s", layout.storage, layout.chunk_patches, layout.compression
            )
            row = measure_layout(
                source, patches, layout, Path(directory), block, batch_size, repeats
            )
            rows.append(row)
    return rows


def format_layout(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layout: chunk (patches, MB) | compression | size vs raw | write img/s | "
        "write + md5 img/s | block read img/s (sequential / shuffled) | streaming loader img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stored = (
            "contiguous"
            if r["storage"] == "contiguous"
            else f"chunked: {r['chunk_patches']} ({r['chunk_mb']:.1f})"
        )
        lines.append(
            f"| {stored} | {r['compression']} | "
            f"{r['size_ratio']:.2f} | {r['write_img_s']:,.0f} | {r['write_and_md5_img_s']:,.0f} | "
            f"{r['sequential_read_img_s']:,.0f} / {r['shuffled_block_read_img_s']:,.0f} | "
            f"{r['loader_streaming_img_s']:,.0f} |"
        )
    return "\n".join(lines)
