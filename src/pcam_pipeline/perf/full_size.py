"""validate, preprocess and the streaming loader on a PCAM-sized split, each against the raw
read of the same bytes (`python -m pcam_pipeline.perf full`).

Writes a PCAM-format train split of 262,144 patches (7.25 GB; tiled from the synthetic
generator, each patch made unique) plus small valid/test splits under a work directory, then
times the raw read of the train file (cold: evicted from the page cache; warm: the best block
size) and its raw copy (read + write), validate's work from a cold and a warm page cache and
preprocess's (each in a child process, for its own peak memory), and our streaming loader on
the preprocessed result. Everything it wrote is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.bench.measure import (
    PCAM_TRAIN_PATCHES,
    copy_seconds,
    evict,
    median,
    read_seconds,
)
from pcam_pipeline.data.hdf5 import blocks, write_pcam_split
from pcam_pipeline.data.pcam import LABEL_SHAPE, PATCH_BYTES, PATCH_SHAPE, SPLITS, split_files
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.params import Params
from pcam_pipeline.perf.children import PerfError, run_child

log = logging.getLogger(__name__)
FULL_DIR = Path("/tmp/pcam-full")  # where the generated files go unless --dir says otherwise
BASE_PATCHES = 2048  # distinct synthetic patches the full-size train split is tiled from
FULL_OTHER_SPLITS = 1024  # valid and test patches in the full-size run
RAW_READ_BLOCKS = (256, 1024)  # the raw read's upper bound: the faster of these block sizes
REPEATS = 3  # warm validate runs, and streaming-loader runs


def write_full_pcam(directory: Path, params: Params, patches: int) -> dict[str, Any]:
    """PCAM-format files: a `patches`-patch train split and small valid/test splits.

    Train is tiled from BASE_PATCHES synthetic patches in blocks; each copy gets its index
    written into its top-left pixel, so every patch is distinct (as in PCAM) and validate's
    duplicate and leakage checks do their full work. Memory stays at a few blocks.
    """
    fetch = params.fetch
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for split in ("valid", "test"):
        x, y = generate_split(fetch.seed, split, FULL_OTHER_SPLITS, fetch.positive_fraction)
        write_pcam_split(directory, split, x, y)
    base_x, base_y = generate_split(fetch.seed, "train", BASE_PATCHES, fetch.positive_fraction)
    x_path, y_path = split_files(directory, "train")
    with h5py.File(x_path, "w") as handle:
        x = handle.create_dataset("x", shape=(patches, *PATCH_SHAPE), dtype="uint8")
        for part in blocks(patches, 8192):
            index = np.arange(part.start, part.stop)
            tile = np.take(base_x, index % BASE_PATCHES, axis=0)
            for channel in range(PATCH_SHAPE[2]):
                tile[:, 0, 0, channel] = (index >> (8 * channel)) & 0xFF
            x[part] = tile
    labels = np.resize(base_y, patches).astype(np.uint8)
    with h5py.File(y_path, "w") as handle:
        handle.create_dataset("y", data=labels.reshape(-1, *LABEL_SHAPE))
    return {
        "generate_seconds": time.perf_counter() - start,
        "train_patches": patches,
        "other_split_patches": 2 * FULL_OTHER_SPLITS,
    }


def check_disk(directory: Path, needed: int) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise PerfError(
            f"the full-size benchmark needs {needed / 1e9:.1f} GB free under {directory} "
            f"(PCAM-format input + preprocessed output), but {probe} has {free / 1e9:.1f} GB; "
            "give --dir a roomier place (e.g. node-local $TMPDIR) or fewer --patches"
        )


def split_lengths(directory: Path) -> dict[str, int]:
    lengths = {}
    for split in SPLITS:
        with h5py.File(split_files(directory, split)[1], "r") as handle:
            lengths[split] = int(handle["y"].shape[0])
    return lengths


def raw_reads(train_x: Path, block: int) -> dict[str, Any]:
    """The raw read of the train file: cold (evicted first, where that works) at the validate
    block size, and warm at the best of a few block sizes."""
    evicted = evict(train_x)
    seconds, n, _ = read_seconds(train_x, block)
    warm = {
        size: n / median([read_seconds(train_x, size)[0] for _ in range(REPEATS)])
        for size in sorted({block, *RAW_READ_BLOCKS})
    }
    best = max(warm.values())
    return {
        "raw_cold_img_s": n / seconds if evicted else None,
        "raw_warm_by_block_img_s": {str(size): rate for size, rate in warm.items()},
        "raw_warm_img_s": best,
        "raw_warm_gb_s": best * PATCH_BYTES / 1e9,
    }


def time_validate(spec: dict[str, Any], train_x: Path, total: int, cold: bool) -> dict[str, Any]:
    """validate's work in child processes: once from a cold page cache (when `cold`), then
    REPEATS times warm. Memory: the worst run's."""
    validate_cold = run_child("validate", spec, evict_first=train_x if cold else None)
    warm_runs = [run_child("validate", spec) for _ in range(REPEATS)]
    validate = max(warm_runs, key=lambda run: run["peak_rss_mb"])
    validate["img_s"] = median([total / run["seconds"] for run in warm_runs])
    validate["repeats"] = len(warm_runs)
    if cold:
        validate["cold_img_s"] = total / validate_cold["seconds"]
    return validate


def time_streaming(
    processed_train: Path, params_spec: dict[str, Any], block: int
) -> dict[str, Any]:
    """Our streaming loader in child processes, interleaved with the raw read of the same file
    so that both see the same page cache. Memory: the worst run's."""
    raw_rates, runs = [], []
    for _ in range(REPEATS):
        seconds, rows, _ = read_seconds(processed_train, block)
        raw_rates.append(rows / seconds)
        runs.append(run_child("loader", {"params": params_spec, "path": str(processed_train)}))
    loader = max(runs, key=lambda run: run["peak_rss_mb"])
    loader["img_s"] = median([run["patches"] / run["seconds"] for run in runs])
    loader["raw_read_img_s"] = median(raw_rates)
    loader["fraction_of_raw"] = loader["img_s"] / loader["raw_read_img_s"]
    loader["repeats"] = len(runs)
    return loader


def targets(validate: dict[str, Any], preprocess: dict[str, Any]) -> dict[str, bool]:
    return {
        "validate_at_least_half_of_raw_read": validate["fraction_of_raw_warm"] >= 0.5,
        "preprocess_at_least_half_of_raw_read": preprocess["fraction_of_raw_warm"] >= 0.5,
        "preprocess_at_least_half_of_raw_copy": preprocess["fraction_of_raw_copy"] >= 0.5,
        "validate_peak_memory_within_2x_size": validate["peak_rss_over_train_size"] <= 2,
        "preprocess_peak_memory_within_2x_size": preprocess["peak_rss_over_train_size"] <= 2,
    }


def measure(params: Params, pcam_dir: Path, work: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the full-size run on the PCAM-format `pcam_dir`, added to `result`."""
    train_x = split_files(pcam_dir, "train")[0]
    total = result["train_patches"] + result["other_split_patches"]
    result.update(raw_reads(train_x, params.validate_.block_patches))
    # Writing 7 GB meets the kernel's dirty-page throttling, which differs from one run to the
    # next: copy before and after preprocess, and compare with the faster copy.
    copy_block = params.preprocess.block_patches
    os.sync()  # each writer starts with no one else's dirty pages to flush
    copies = [copy_seconds(train_x, work / "copy.bin", copy_block)[0]]
    spec = {"params": params.as_dict(), "pcam_dir": str(pcam_dir)}
    log.info("full-size benchmark: validate, from a cold page cache and a warm one")
    validate = time_validate(spec, train_x, total, cold=result["raw_cold_img_s"] is not None)
    log.info("full-size benchmark: preprocess")
    os.sync()
    out_dir = work / "processed"
    preprocess = run_child("preprocess", {**spec, "out_dir": str(out_dir)})
    preprocess["img_s"] = total / preprocess["seconds"]
    os.sync()
    copies.append(copy_seconds(train_x, work / "copy.bin", copy_block)[0])
    n = result["train_patches"]
    result["raw_copy_runs_img_s"] = [n / seconds for seconds in copies]
    result["raw_copy_img_s"] = n / min(copies)
    preprocess["fraction_of_raw_copy"] = preprocess["img_s"] / result["raw_copy_img_s"]
    processed_train = ProcessedData(out_dir).split_path("train")
    log.info("full-size benchmark: streaming loader")
    loader = time_streaming(processed_train, spec["params"], params.loader.block_patches)
    size_mb = train_x.stat().st_size / 2**20
    for name, stage in (("validate", validate), ("preprocess", preprocess)):
        stage["fraction_of_raw_warm"] = stage["img_s"] / result["raw_warm_img_s"]
        stage["peak_rss_over_train_size"] = stage["peak_rss_mb"] / size_mb
        result[name] = stage
    if result["raw_cold_img_s"] and "cold_img_s" in validate:
        validate["fraction_of_raw_cold"] = validate["cold_img_s"] / result["raw_cold_img_s"]
    result["loader_streaming"] = loader
    result["train_x_gb"] = train_x.stat().st_size / 1e9
    result["processed_train_gb"] = processed_train.stat().st_size / 1e9
    result["targets"] = targets(validate, preprocess)
    return result


def full_size(
    params: Params,
    patches: int = PCAM_TRAIN_PATCHES,
    directory: Path = FULL_DIR,
    keep: bool = False,
    source: Path | None = None,
) -> dict[str, Any]:
    """Validate, preprocess and stream a PCAM-sized split of `patches` train patches, written
    under `directory`; compare each with the raw read.

    `source`: an existing PCAM-format directory (e.g. data/raw with the real files) to measure
    instead of generating one; it is only read.
    """
    root = Path(directory)
    if source is None:
        check_disk(root, int(2.1 * (patches + 2 * FULL_OTHER_SPLITS) * PATCH_BYTES))
    else:
        lengths = split_lengths(source)
        check_disk(root, int(1.1 * sum(lengths.values()) * PATCH_BYTES))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    try:
        if source is None:
            pcam_dir = work / "pcam"
            log.info("full-size benchmark: writing %d train patches under %s", patches, work)
            result = write_full_pcam(pcam_dir, params, patches)
        else:
            pcam_dir = source
            others = lengths["valid"] + lengths["test"]
            result = {
                "source": str(source),
                "train_patches": lengths["train"],
                "other_split_patches": others,
            }
        return measure(params, pcam_dir, work, result)
    finally:
        if keep:
            log.info("full-size benchmark: kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if root.exists() and not any(root.iterdir()):
                root.rmdir()
