"""benchmark: how fast the data path and the model run here, written as DVC metrics and plots.

Loader throughput is measured side by side in one process, on the same file, for:
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

Model throughput covers train steps and inference over the params' batch sizes, devices and
precisions, plus batch-1 latency and peak memory; out of memory at a batch size is a result.
`benchmark.full: true` also runs the full-size measurements of `pcam_pipeline.perf`.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil
import torch
from torch import nn

from pcam_pipeline import numerics
from pcam_pipeline.data.hdf5 import PatchBlocks
from pcam_pipeline.data.loader import DeviceBatches, Split, augment, normalise
from pcam_pipeline.measure import (
    is_out_of_memory,
    loader_epoch,
    median,
    peak_rss_mb,
    rate,
    synchronize,
    time_training_loop,
    timed,
)
from pcam_pipeline.models import build_model
from pcam_pipeline.params import BenchmarkParams, Params
from pcam_pipeline.paths import BENCHMARK_DIR, BENCHMARK_FILE
from pcam_pipeline.repro import write_json
from pcam_pipeline.runtime import cpu_numerics_record, processed_data, resolve_device

log = logging.getLogger(__name__)
LOADER_REPEATS = 5
BASELINE_REPEATS = 3
TARGET_SPEEDUP = 20.0  # ours vs the per-sample baseline
TARGET_FRACTION_OF_RAW = 0.5  # streaming vs the raw contiguous read
TARGET_PATCHES = 20_000  # the targets hold on at least this many patches
ROW_BUDGET_S = 1.0  # timed seconds per model measurement, at most (keeps the stage short)
LOOP_BUDGET_S = 2.0  # timed seconds of the training loop per batch size and precision


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


# ---------------------------------------------------------------------------------------------
# Loader designs


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
    x = torch.randint(
        0,
        256,
        (batch_size, 96, 96, 3),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    mean, std = torch.tensor([0.70, 0.55, 0.70]), torch.tensor([0.15, 0.20, 0.15])
    n_batches = max(2, params.benchmark.loader_patches // batch_size)

    def images_per_second(step: Callable[[int], object]) -> float:
        start, done = time.perf_counter(), 0
        while done < n_batches and (done < 2 or time.perf_counter() - start < budget_s):
            step(done)
            done += 1
        return rate(done * batch_size, time.perf_counter() - start)

    plain, full = [], []
    for _ in range(repeats):
        plain.append(images_per_second(lambda _: normalise(x, mean, std)))
        full.append(
            images_per_second(
                lambda i: normalise(
                    augment(x, torch.Generator().manual_seed(i), flags.flip, flags.rot90),
                    mean,
                    std,
                )
            )
        )
    return {"normalise_cpu_img_s": median(plain), "normalise_augment_cpu_img_s": median(full)}


def time_loader_designs(
    train: Path, params: Params, repeats: int = LOADER_REPEATS
) -> dict[str, Any]:
    """Every design on the same bytes, round-robin, `repeats` times; medians of img/s."""
    bp, loader, batch_size = params.benchmark, params.loader, params.train.batch_size
    workdir = Path(tempfile.mkdtemp(prefix="pcam-benchmark-"))
    try:
        path, distinct = benchmark_file(train, bp.loader_patches, workdir)
        n = bp.loader_patches
        baseline_count = min(bp.baseline_patches, n)
        memory_options = loader.model_copy(update={"in_memory": True})
        stream_options = loader.model_copy(update={"in_memory": False})
        samples: dict[str, list[float]] = {}
        in_memory_note = ""

        def record(name: str, count: int | None, seconds: float) -> None:
            if count is not None:
                samples.setdefault(name, []).append(rate(count, seconds))

        for repeat in range(repeats):
            start = time.perf_counter()
            record(
                "raw_h5py_img_s",
                raw_h5py_read(path, loader.block_patches),
                time.perf_counter() - start,
            )
            start = time.perf_counter()
            record(
                "raw_pread_img_s",
                raw_pread(path, loader.block_patches),
                time.perf_counter() - start,
            )

            start = time.perf_counter()
            split = Split.open(path, memory_options)
            load_seconds = time.perf_counter() - start
            if split.in_memory:
                start = time.perf_counter()
                seen = loader_epoch(split, batch_size, repeat)
                epoch_seconds = time.perf_counter() - start
                record("ours_in_memory_img_s", seen, epoch_seconds)
                record("in_memory_load_img_s", n, load_seconds)
                record("ours_in_memory_with_load_img_s", seen, load_seconds + epoch_seconds)
            else:
                in_memory_note = split.note
            del split

            start = time.perf_counter()
            seen = loader_epoch(Split.open(path, stream_options), batch_size, repeat)
            record("ours_streaming_img_s", seen, time.perf_counter() - start)

            if repeat < BASELINE_REPEATS:  # slow and steady: fewer repeats
                start = time.perf_counter()
                seen = per_sample_epoch(
                    path, baseline_count, batch_size, loader.num_workers, repeat
                )
                record("per_sample_baseline_img_s", seen, time.perf_counter() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {name: median(values) for name, values in samples.items()}
    raw = max(results["raw_h5py_img_s"], results.get("raw_pread_img_s", 0.0))
    baseline = results["per_sample_baseline_img_s"]
    results.update(
        patches=n,
        distinct_patches=distinct,
        baseline_patches=baseline_count,
        batch_size=batch_size,
        block_patches=loader.block_patches,
        num_workers=loader.num_workers,
        repeats=repeats,
        raw_read_img_s=raw,
        raw_read_gb_s=raw * 96 * 96 * 3 / 1e9,
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


# ---------------------------------------------------------------------------------------------
# Model throughput


def time_model(
    model: nn.Module, device: torch.device, precision: str, batch_size: int, params: BenchmarkParams
) -> dict[str, Any]:
    """Train-step and inference img/s at one batch size; out of memory is recorded, not raised."""
    bf16 = precision == "bf16"
    row: dict[str, Any] = {"device": device.type, "precision": precision, "batch_size": batch_size}
    channels_last = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    try:
        x = torch.randint(0, 256, (batch_size, 96, 96, 3), dtype=torch.uint8, device=device)
        y = torch.randint(0, 2, (batch_size,), device=device).float()
        mean = torch.full((3,), 0.5, device=device)
        std = torch.full((3,), 0.25, device=device)

        def train_step() -> None:
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(normalise(x, mean, std, channels_last))
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def infer() -> None:
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                model(normalise(x, mean, std, channels_last))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup, iters = params.warmup_iters, params.timed_iters
        row["train_img_s"] = rate(
            batch_size, timed(train_step, device, warmup, iters, ROW_BUDGET_S)
        )
        row["infer_img_s"] = rate(batch_size, timed(infer, device, warmup, iters, ROW_BUDGET_S))
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        row.update(oom=1, error=f"out of memory: {str(error).splitlines()[0][:200]}")
        log.warning(
            "benchmark %s %s batch %d: out of memory (recorded as a result)",
            device.type,
            precision,
            batch_size,
        )
    finally:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def latency(
    model: nn.Module, device: torch.device, precision: str, params: BenchmarkParams
) -> dict[str, float]:
    """Batch-1 inference latency percentiles (ms), each call synchronised."""
    x = torch.randint(0, 256, (1, 96, 96, 3), dtype=torch.uint8, device=device)
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    model.eval()
    samples = []
    with torch.no_grad():
        for i in range(params.warmup_iters + params.latency_iters):
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(normalise(x, mean, std, device.type == "cuda"))
            synchronize(device)
            if i >= params.warmup_iters:
                samples.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p95_ms": float(np.percentile(samples, 95)),
    }


def time_loops(params: Params) -> dict[str, Any]:
    """The training loop `pcam train` runs here (its device, data and compile mode), end to end
    against the same step on resident data, per batch size and precision: see
    `measure.time_training_loop`. On the CPU train never uses bf16, so only fp32 is timed."""
    bp = params.benchmark
    device = resolve_device(params.train.device)
    dataset = processed_data()
    split = Split.open(dataset.split_path("train"), params.loader)
    mean, std = dataset.normalisation(device)
    feeder = DeviceBatches(split, device, params.loader)
    precisions = bp.precisions if device.type == "cuda" else ["fp32"]
    rows = []
    for precision in precisions:
        for batch_size in bp.batch_sizes:
            train = params.train.model_copy(
                update={"batch_size": batch_size, "bf16": precision == "bf16"}
            )
            row = time_training_loop(
                train, params.loader, feeder, mean, std, bp.warmup_iters, LOOP_BUDGET_S
            )
            if row.get("oom"):
                log.warning(
                    "benchmark loop %s %s batch %d: out of memory (recorded as a result)",
                    device.type,
                    precision,
                    batch_size,
                )
            rows.append(row)
    return {"rows": rows, "feeder": feeder.mode, "feeder_note": feeder.note}


def time_models(params: Params) -> dict[str, Any]:
    bp = params.benchmark
    rows: list[dict[str, Any]] = []
    latencies: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for device_name in bp.devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            skipped.append("cuda: no CUDA device visible, CUDA path not measured")
            continue
        device = torch.device(device_name)
        for precision in bp.precisions:
            torch.manual_seed(0)
            model = build_model(params.train).to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            for batch_size in bp.batch_sizes:
                rows.append(time_model(model, device, precision, batch_size, bp))
            latencies[f"{device_name}_{precision}"] = latency(model, device, precision, bp)
            del model
    return {"rows": rows, "latency_batch1": latencies, "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Environment and output


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_model": numerics.cpu_identity()["model"],
        "cpu_numerics": cpu_numerics_record(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "memory_total_gb": psutil.virtual_memory().total / 1e9,
        "load_average_1m": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    for variable in (
        "SLURM_JOB_ID",
        "SLURM_JOB_PARTITION",
        "SLURM_CLUSTER_NAME",
        "SLURM_JOB_NODELIST",
        "SLURM_CPUS_PER_TASK",
        "SLURM_JOB_GPUS",
    ):
        env[variable.lower()] = os.environ.get(variable)
    return env


def headline_series(params: Params) -> str:
    """The device and precision the train stage would use here."""
    cuda = torch.cuda.is_available() and params.train.device != "cpu"
    precision = "bf16" if params.train.bf16 and cuda else "fp32"
    return f"{'cuda' if cuda else 'cpu'}_{precision}"


def run(params: Params) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment()}
    loader = time_loader_designs(processed_data().split_path("train"), params)
    results["loader"] = loader
    loader_done = time.perf_counter()
    results["models"] = time_models(params)
    models_done = time.perf_counter()
    results["loop"] = time_loops(params)
    results["seconds_loader"] = loader_done - started
    results["seconds_models"] = models_done - loader_done
    results["seconds_loop"] = time.perf_counter() - models_done
    results["targets"] = loader_targets(loader)
    headline = headline_series(params)
    rows = [
        r
        for r in results["models"]["rows"]
        if f"{r['device']}_{r['precision']}" == headline and "train_img_s" in r
    ]
    if rows:
        closest = min(rows, key=lambda r: abs(r["batch_size"] - params.train.batch_size))
        loader_rate = loader.get("ours_in_memory_img_s", loader["ours_streaming_img_s"])
        loader["loader_over_train_step"] = loader_rate / closest["train_img_s"]
    cuda_peaks = [
        r["cuda_max_allocated_mb"]
        for r in results["models"]["rows"]
        if "cuda_max_allocated_mb" in r
    ]
    results["memory"] = {
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_allocated_mb": max(cuda_peaks) if cuda_peaks else None,
    }
    if params.benchmark.full:
        from pcam_pipeline import perf

        results["full"] = perf.full_size(params)
    results["seconds"] = time.perf_counter() - started
    results["headline_series"] = headline
    return results


def metrics_from(results: dict[str, Any]) -> dict[str, Any]:
    """benchmark.json: nested dicts of numbers (dvc metrics diff flattens them to dotted keys)."""
    rows = results["models"]["rows"]
    model = {}
    for r in rows:
        key = f"{r['device']}_{r['precision']}_bs{r['batch_size']}"
        model[key] = {k: v for k, v in r.items() if k.endswith(("_img_s", "_mb")) or k == "oom"}
    loop = {
        f"{r['device']}_{r['precision']}_bs{r['batch_size']}": {
            k: v for k, v in r.items() if isinstance(v, int | float) and k != "batch_size"
        }
        for r in results["loop"]["rows"]
    }
    metrics: dict[str, Any] = {
        "loader": results["loader"],
        "loop": loop,
        "model": model,
        "latency_batch1": results["models"]["latency_batch1"],
        "memory": results["memory"],
        "targets": results["targets"],
        "seconds": results["seconds"],
        "seconds_loader": results["seconds_loader"],
        "seconds_models": results["seconds_models"],
        "seconds_loop": results["seconds_loop"],
        "environment": results["environment"],
        "headline_series": results["headline_series"],
        "skipped": results["models"]["skipped"],
        "errors": {
            f"{r['device']}_{r['precision']}_bs{r['batch_size']}": r["error"]
            for r in rows
            if "error" in r
        },
    }
    if "full" in results:
        metrics["full"] = results["full"]
    return metrics


def write_reports(results: dict[str, Any]) -> None:
    write_json(BENCHMARK_FILE, metrics_from(results))
    rows = results["models"]["rows"]
    headline = results["headline_series"]
    if BENCHMARK_DIR.exists():
        shutil.rmtree(BENCHMARK_DIR)
    # The plot dvc.yaml draws: the device/precision training uses, throughput vs batch size.
    write_json(
        BENCHMARK_DIR / "throughput.json",
        [
            {
                "batch_size": r["batch_size"],
                "series": headline,
                "train_img_s": r.get("train_img_s"),
                "infer_img_s": r.get("infer_img_s"),
            }
            for r in rows
            if f"{r['device']}_{r['precision']}" == headline
        ],
    )
    write_json(
        BENCHMARK_DIR / "loop.json",
        [
            {
                "batch_size": r["batch_size"],
                "series": f"{r['device']}_{r['precision']}",
                "end_to_end_img_s": r.get("end_to_end_img_s"),
                "resident_img_s": r.get("resident_img_s"),
            }
            for r in results["loop"]["rows"]
        ],
    )
    write_json(
        BENCHMARK_DIR / "throughput_all.json",
        [{"series": f"{r['device']}_{r['precision']}", **r} for r in rows],
    )
    loader = results["loader"]
    designs = [
        ("ours, in memory", "ours_in_memory_img_s"),
        ("ours, streaming", "ours_streaming_img_s"),
        ("per-sample baseline", "per_sample_baseline_img_s"),
        ("raw read (h5py)", "raw_h5py_img_s"),
        ("raw read (pread)", "raw_pread_img_s"),
    ]
    write_json(
        BENCHMARK_DIR / "loader.json",
        [{"design": name, "img_s": loader[key]} for name, key in designs if key in loader],
    )
    if "full" in results:
        write_json(BENCHMARK_DIR / "full.json", results["full"])


def main(params: Params) -> None:
    results = run(params)
    write_reports(results)
    loader = results["loader"]
    log.info(
        "loader on %d patches: ours %s img/s in memory, %.0f streaming; per-sample baseline "
        "%.0f; raw read %.0f -> %.0fx the baseline, streaming at %.0f%% of raw",
        loader["patches"],
        f"{loader.get('ours_in_memory_img_s', float('nan')):.0f}",
        loader["ours_streaming_img_s"],
        loader["per_sample_baseline_img_s"],
        loader["raw_read_img_s"],
        max(
            loader.get("speedup_in_memory_vs_baseline", 0.0),
            loader["speedup_streaming_vs_baseline"],
        ),
        100 * loader["streaming_fraction_of_raw"],
    )
    for name, met in results["targets"].items():
        if not met:
            log.warning("benchmark target not met: %s", name)
    for reason in results["models"]["skipped"]:
        log.info("benchmark skipped %s", reason)
    for row in results["loop"]["rows"]:
        if "end_to_end_img_s" in row:
            log.info(
                "training loop %s %s batch %d: %.0f img/s end to end, %.0f with the data on "
                "the device (fed %.0f%%): a PCAM epoch in %.1f s",
                row["device"],
                row["precision"],
                row["batch_size"],
                row["end_to_end_img_s"],
                row["resident_img_s"],
                100 * row["fed_fraction"],
                row["pcam_epoch_s"],
            )
    log.info("benchmark done in %.1f s", results["seconds"])
