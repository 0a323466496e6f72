"""benchmark: how fast the data path and the model run here, written as DVC metrics and plots.

Loader throughput is measured side by side in one process for three designs on the same bytes:
our batch loader, the course skeleton's per-sample dataset (kept here only as the reference), and
one raw contiguous read (the upper bound). Model throughput covers train steps and inference over
the params' batch sizes, devices and precisions, plus batch-1 latency and peak memory.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from pcam_pipeline.data.loader import Split, augment, normalise
from pcam_pipeline.models import build_model
from pcam_pipeline.params import BenchmarkParams, LoaderParams, Params
from pcam_pipeline.paths import BENCHMARK_DIR, BENCHMARK_FILE
from pcam_pipeline.repro import write_json
from pcam_pipeline.stages.train import data_dir

log = logging.getLogger(__name__)


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


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_loader_designs(path: Path, loader: LoaderParams, params: BenchmarkParams,
                        batch_size: int) -> dict[str, Any]:
    with h5py.File(path, "r") as handle:
        length = min(len(handle["y"]), params.loader_patches)
        start = time.perf_counter()
        raw = handle["x"][:length]
        raw_seconds = time.perf_counter() - start
    del raw
    results: dict[str, Any] = {"patches": length, "raw_read_img_s": rate(length, raw_seconds)}

    for mode, in_memory in (("in_memory", True), ("streaming", False)):
        options = loader.model_copy(update={"in_memory": in_memory})
        start = time.perf_counter()
        split = Split.open(path, options)
        order = split.epoch_order(torch.Generator().manual_seed(0))[:length]
        if in_memory:
            order = order[order < length]
        seen = 0
        mean, std = torch.zeros(3), torch.ones(3)
        for x, _ in split.batches(order, batch_size):
            images = normalise(x, mean, std)
            augment(images, torch.Generator().manual_seed(seen), True, True)
            seen += len(x)
        results[f"ours_{mode}_img_s"] = rate(seen, time.perf_counter() - start)

    baseline = PerSampleBaseline(path)
    count = min(params.baseline_patches, length)
    start = time.perf_counter()
    batches = torch.utils.data.DataLoader(
        torch.utils.data.Subset(baseline, range(count)), batch_size=batch_size, shuffle=False)
    for _ in batches:
        pass
    results["per_sample_baseline_img_s"] = rate(count, time.perf_counter() - start)
    ours = max(results["ours_in_memory_img_s"], results["ours_streaming_img_s"])
    results["speedup_vs_baseline"] = ours / results["per_sample_baseline_img_s"]
    results["streaming_fraction_of_raw"] = (results["ours_streaming_img_s"]
                                            / results["raw_read_img_s"])
    return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / iters


def time_model(model: nn.Module, device: torch.device, precision: str, batch_size: int,
               params: BenchmarkParams) -> dict[str, Any]:
    bf16 = precision == "bf16"
    x = torch.randint(0, 256, (batch_size, 96, 96, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device).float()
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    channels_last = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()

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

    row: dict[str, Any] = {"device": device.type, "precision": precision,
                           "batch_size": batch_size}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row["train_img_s"] = rate(batch_size, _timed(train_step, device, params.warmup_iters,
                                                     params.timed_iters))
        row["infer_img_s"] = rate(batch_size, _timed(infer, device, params.warmup_iters,
                                                     params.timed_iters))
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def latency(model: nn.Module, device: torch.device, params: BenchmarkParams) -> dict[str, float]:
    x = torch.randint(0, 256, (1, 96, 96, 3), dtype=torch.uint8, device=device)
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    model.eval()
    samples = []
    with torch.no_grad():
        for i in range(params.warmup_iters + params.latency_iters):
            _synchronize(device)
            start = time.perf_counter()
            model(normalise(x, mean, std, device.type == "cuda"))
            _synchronize(device)
            if i >= params.warmup_iters:
                samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(samples, 50)), "p95_ms": float(np.percentile(samples, 95))}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for variable in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME"):
        env[variable.lower()] = os.environ.get(variable)
    return env


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(params: Params) -> dict[str, Any]:
    bp = params.benchmark
    results: dict[str, Any] = {"environment": environment()}
    results["loader"] = time_loader_designs(data_dir() / "train.h5", params.loader, bp,
                                            params.train.batch_size)
    rows, skipped = [], []
    latencies = {}
    for device_name in bp.devices:
        if device_name == "cuda" and not torch.cuda.is_available():
            skipped.append("cuda: no CUDA device visible, CUDA path not measured")
            continue
        device = torch.device(device_name)
        model = build_model(params.train).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        for precision in bp.precisions:
            for batch_size in bp.batch_sizes:
                rows.append(time_model(model, device, precision, batch_size, bp))
        latencies[device_name] = latency(model, device, bp)
    results["model"] = {"rows": rows, "latency_batch1": latencies, "skipped": skipped}
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def main(params: Params) -> None:
    results = run(params)
    rows = results["model"]["rows"]
    metrics = {
        "loader": results["loader"],
        "model": {f"{r['device']}_{r['precision']}_bs{r['batch_size']}":
                  {k: v for k, v in r.items() if k.endswith("_img_s") or k.endswith("_mb")}
                  for r in rows},
        "latency_batch1": results["model"]["latency_batch1"],
        "peak_rss_mb": results["peak_rss_mb"],
    }
    write_json(BENCHMARK_FILE, {**metrics, "environment": results["environment"],
                                "skipped": results["model"]["skipped"]})
    write_json(BENCHMARK_DIR / "throughput.json",
               [{"batch_size": r["batch_size"], "series": f"{r['device']}-{r['precision']}",
                 "train_img_s": r.get("train_img_s"), "infer_img_s": r.get("infer_img_s")}
                for r in rows])
    loader = results["loader"]
    log.info("loader: ours %.0f img/s (in memory) / %.0f (streaming), baseline %.0f, raw %.0f",
             loader["ours_in_memory_img_s"], loader["ours_streaming_img_s"],
             loader["per_sample_baseline_img_s"], loader["raw_read_img_s"])
    for reason in results["model"]["skipped"]:
        log.info("benchmark skipped %s", reason)
