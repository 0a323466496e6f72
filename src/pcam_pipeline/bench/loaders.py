"""Loader throughput, measured side by side in one process, on the same file, for:

- ours: the uint8 batches the training loop receives (ready to ship to the device), from a split
  held in memory (the one-off load is timed separately) and streamed in blocks from HDF5;
- the course skeleton's per-sample dataset (kept here only as the reference; nothing else uses
  it): the file opened for every item, float conversion, clip and transpose in Python, batched
  by a DataLoader;
- the raw contiguous read of the same bytes, the upper bound: consecutive blocks into a reused
  buffer, through h5py and through plain pread of the dataset's storage (the faster counts).

The CPU cost of normalisation + augmentation (the part that runs on the GPU when training
there) is reported separately. The designs run round-robin, `LOADER_REPEATS` times, and the
median counts: the machine may be shared. When the train split is smaller than
`benchmark.loader_patches`, it is tiled into a temporary file of that size (same HDF5 layout).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pcam_pipeline.bench.measure import median, rate
from pcam_pipeline.bench.timing import loader_epoch
from pcam_pipeline.data.loader import Split, augment, normalise
from pcam_pipeline.data.pcam import PATCH_BYTES, PATCH_SHAPE
from pcam_pipeline.data.processed import normalisation
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.params import LoaderParams, Params

LOADER_REPEATS = 5
BASELINE_REPEATS = 3
TARGET_SPEEDUP = 20.0  # ours vs the per-sample baseline
TARGET_FRACTION_OF_RAW = 0.5  # streaming vs the raw contiguous read
TARGET_PATCHES = 20_000  # the targets hold on at least this many patches
# Plausible train-split statistics, for timing normalisation on random patches.
TYPICAL_STATS = {"mean": [0.70, 0.55, 0.70], "std": [0.15, 0.20, 0.15]}


class PerSampleBaseline(torch.utils.data.Dataset):
    """The course skeleton's loader, kept as the reference: one patch per call, Python work each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with h5py.File(path, "r") as handle:
            self.length = len(handle["y"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with h5py.File(self.path, "r") as handle:
            image = handle["x"][index].astype(np.float32)
            label = int(handle["y"][index])
        image = np.clip(image / 255.0, 0.0, 1.0).transpose(2, 0, 1)
        return torch.from_numpy(image), label


def benchmark_file(train: Path, patches: int, directory: Path) -> tuple[Path, int]:
    """A processed-layout file of exactly `patches` patches: the train split, cut or tiled.

    Same chunking and compression as `train`, so every design reads the bytes training reads.
    Returns the file and how many distinct patches it holds.
    """
    with h5py.File(train, "r") as source:
        x, y = source["x"], source["y"]
        distinct = min(len(y), patches)
        base_x, base_y = x[:distinct], y[:distinct]
        options: dict[str, Any] = {"chunks": x.chunks} if x.chunks else {}
        if x.compression:
            options.update(compression=x.compression, compression_opts=x.compression_opts)
    path = directory / "loader-benchmark.h5"
    with h5py.File(path, "w") as target:
        out_x = target.create_dataset(
            "x", shape=(patches, *base_x.shape[1:]), dtype="uint8", **options
        )
        out_y = target.create_dataset("y", shape=(patches,), dtype="uint8")
        for start in range(0, patches, distinct):
            stop = min(start + distinct, patches)
            out_x[start:stop] = base_x[: stop - start]
            out_y[start:stop] = base_y[: stop - start]
    return path, distinct


def raw_h5py_read(path: Path, block: int) -> int:
    """The same bytes through h5py: consecutive blocks into one reused buffer."""
    with h5py.File(path, "r") as handle:
        x = handle["x"]
        buffer = np.empty((block, *x.shape[1:]), dtype=x.dtype)
        for start in range(0, len(x), block):
            stop = min(start + block, len(x))
            x.read_direct(buffer, np.s_[start:stop], np.s_[0 : stop - start])
        return len(x)


def raw_pread(path: Path, block: int) -> int | None:
    """The same bytes by pread of the dataset's storage; None when its layout has no raw bytes."""
    with PatchBlocks(path) as reader:
        if not reader.direct:
            return None
        buffer = np.empty((block, *reader.row_shape), dtype=reader.dtype)
        for start in range(0, reader.length, block):
            reader.read_into(buffer, start, min(start + block, reader.length))
        return reader.length


def per_sample_epoch(path: Path, count: int, batch_size: int, workers: int, seed: int) -> int:
    baseline = PerSampleBaseline(path)
    subset = torch.utils.data.Subset(baseline, range(min(count, len(baseline))))
    batches = torch.utils.data.DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return sum(len(y) for _, y in batches)


def normalise_augment_rates(
    params: Params, repeats: int, budget_s: float = 0.5
) -> dict[str, float]:
    """CPU img/s of normalise, and of normalise + augment, at the training batch size.

    Each repeat runs up to an epoch of `benchmark.loader_patches` (at most `budget_s` seconds).
    """
    batch_size, flags = params.train.batch_size, params.train.augment
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch_size, *PATCH_SHAPE), dtype=torch.uint8, generator=generator)
    mean, std = normalisation(TYPICAL_STATS, torch.device("cpu"))
    n_batches = max(2, params.benchmark.loader_patches // batch_size)

    def images_per_second(step: Callable[[int], object]) -> float:
        start, done = time.perf_counter(), 0
        while done < n_batches and (done < 2 or time.perf_counter() - start < budget_s):
            step(done)
            done += 1
        return rate(done * batch_size, time.perf_counter() - start)

    def augmented(i: int) -> torch.Tensor:
        return augment(x, torch.Generator().manual_seed(i), flags.flip, flags.rot90)

    plain, full = [], []
    for _ in range(repeats):  # interleaved: both see the same load on a shared machine
        plain.append(images_per_second(lambda _: normalise(x, mean, std)))
        full.append(images_per_second(lambda i: normalise(augmented(i), mean, std)))
    return {"normalise_cpu_img_s": median(plain), "normalise_augment_cpu_img_s": median(full)}


class Rates:
    """img/s samples per design, over the round-robin repeats."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, count: int | None, seconds: float) -> None:
        if count is not None:  # None: the design does not apply to this file
            self.samples.setdefault(name, []).append(rate(count, seconds))

    def timed(self, name: str, run: Callable[..., int | None], *args: Any) -> None:
        """Time `run(*args)`, which returns how many patches it delivered."""
        start = time.perf_counter()
        count = run(*args)
        self.add(name, count, time.perf_counter() - start)

    def medians(self) -> dict[str, float]:
        return {name: median(values) for name, values in self.samples.items()}


def streaming_epoch(path: Path, options: LoaderParams, batch_size: int, seed: int) -> int:
    """Our loader streaming the split in blocks: opening it, then an epoch."""
    return loader_epoch(Split.open(path, options), batch_size, seed)


def time_in_memory(
    path: Path, options: LoaderParams, batch_size: int, seed: int, rates: Rates
) -> str:
    """Our loader on the split held in memory: the load, an epoch, both together. Returns why
    the split was streamed instead ("" when it was held)."""
    start = time.perf_counter()
    split = Split.open(path, options)
    load_seconds = time.perf_counter() - start
    if not split.in_memory:
        return split.note
    start = time.perf_counter()
    seen = loader_epoch(split, batch_size, seed)
    epoch_seconds = time.perf_counter() - start
    rates.add("ours_in_memory_img_s", seen, epoch_seconds)
    rates.add("in_memory_load_img_s", split.length, load_seconds)
    rates.add("ours_in_memory_with_load_img_s", seen, load_seconds + epoch_seconds)
    return ""


def time_designs(
    path: Path, params: Params, repeats: int, baseline_count: int
) -> tuple[dict[str, float], str]:
    """Every design on the file `path`, round-robin, `repeats` times: median img/s of each, and
    why the split could not be held in memory ("" when it was)."""
    loader, batch_size = params.loader, params.train.batch_size
    memory = loader.model_copy(update={"in_memory": True})
    streaming = loader.model_copy(update={"in_memory": False})
    rates, note = Rates(), ""
    for repeat in range(repeats):
        rates.timed("raw_h5py_img_s", raw_h5py_read, path, loader.block_patches)
        rates.timed("raw_pread_img_s", raw_pread, path, loader.block_patches)
        note = time_in_memory(path, memory, batch_size, repeat, rates)
        rates.timed("ours_streaming_img_s", streaming_epoch, path, streaming, batch_size, repeat)
        if repeat < BASELINE_REPEATS:  # slow and steady: fewer repeats
            workers = loader.num_workers
            baseline = (path, baseline_count, batch_size, workers, repeat)
            rates.timed("per_sample_baseline_img_s", per_sample_epoch, *baseline)
    return rates.medians(), note


def time_loader_designs(
    train: Path, params: Params, repeats: int = LOADER_REPEATS
) -> dict[str, Any]:
    """Every design on the bytes of the train split (cut or tiled to benchmark.loader_patches):
    medians of img/s, and the ratios between them."""
    bp, loader = params.benchmark, params.loader
    workdir = Path(tempfile.mkdtemp(prefix="pcam-benchmark-"))
    try:
        path, distinct = benchmark_file(train, bp.loader_patches, workdir)
        baseline_count = min(bp.baseline_patches, bp.loader_patches)
        results, in_memory_note = time_designs(path, params, repeats, baseline_count)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raw = max(results["raw_h5py_img_s"], results.get("raw_pread_img_s", 0.0))
    baseline = results["per_sample_baseline_img_s"]
    results.update(
        patches=bp.loader_patches,
        distinct_patches=distinct,
        baseline_patches=baseline_count,
        batch_size=params.train.batch_size,
        block_patches=loader.block_patches,
        num_workers=loader.num_workers,
        repeats=repeats,
        raw_read_img_s=raw,
        raw_read_gb_s=raw * PATCH_BYTES / 1e9,
        speedup_streaming_vs_baseline=results["ours_streaming_img_s"] / baseline,
        streaming_fraction_of_raw=results["ours_streaming_img_s"] / raw,
    )
    if "ours_in_memory_img_s" in results:
        results.update(
            speedup_in_memory_vs_baseline=results["ours_in_memory_img_s"] / baseline,
            in_memory_fraction_of_raw=results["ours_in_memory_img_s"] / raw,
        )
    else:
        results["in_memory_skipped"] = in_memory_note
    results.update(normalise_augment_rates(params, BASELINE_REPEATS))
    return results


def loader_targets(loader: dict[str, Any]) -> dict[str, Any]:
    speedup = max(
        loader.get("speedup_in_memory_vs_baseline", 0.0), loader["speedup_streaming_vs_baseline"]
    )
    return {
        "loader_patches_at_least_20000": loader["patches"] >= TARGET_PATCHES,
        "loader_speedup_vs_baseline_at_least_20x": speedup >= TARGET_SPEEDUP,
        "streaming_at_least_half_of_raw_read": (
            loader["streaming_fraction_of_raw"] >= TARGET_FRACTION_OF_RAW
        ),
    }
