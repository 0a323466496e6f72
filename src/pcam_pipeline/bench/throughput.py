"""Model and training-loop throughput, through the code the stages run.

The model table times the real `training.TrainStep` (augmentation off, eager) and
`inference.predict_batches` on random uint8 batches, over the params' batch sizes, devices and
precisions, plus batch-1 latency and peak memory; out of memory at a batch size is a result. The
loop table times the training loop `pcam train` runs here (its device, data and compile mode)
end to end against the same step on resident data (`timing.time_loop`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from pcam_pipeline.bench.measure import rate
from pcam_pipeline.bench.timing import (
    is_out_of_memory,
    out_of_memory_row,
    synchronize,
    time_loop,
    timed,
)
from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.data.processed import ProcessedData, normalisation
from pcam_pipeline.inference import predict_batches
from pcam_pipeline.models.architectures import build_model
from pcam_pipeline.params import BenchmarkParams, Params, TrainParams
from pcam_pipeline.runtime import processed_data, resolve_device, uses_bf16
from pcam_pipeline.train.loop import TrainStep, build_optimizer, prepare_model

log = logging.getLogger(__name__)
ROW_BUDGET_S = 1.0  # timed seconds per model measurement, at most (keeps the stage short)
LOOP_BUDGET_S = 2.0  # timed seconds of the training loop per batch size and precision
RANDOM_PATCH_STATS = {"mean": [0.5] * 3, "std": [0.25] * 3}  # of uniform random uint8 pixels


def random_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (batch_size, *PATCH_SHAPE), dtype=torch.uint8, device=device)
    return x, torch.randint(0, 2, (batch_size,), dtype=torch.uint8, device=device)


def time_model(
    model: nn.Module, train: TrainParams, bench: BenchmarkParams, device: torch.device
) -> dict[str, Any]:
    """Train-step and inference img/s of `model` at train.batch_size, in train.bf16's precision
    where the stages would use it; out of memory is recorded, not raised."""
    batch_size = train.batch_size
    bf16 = uses_bf16(train.bf16, device)
    precision = "bf16" if bf16 else "fp32"
    row: dict[str, Any] = {"device": device.type, "precision": precision, "batch_size": batch_size}
    mean, std = normalisation(RANDOM_PATCH_STATS, device)
    step = TrainStep(model, build_optimizer(model, train), train, mean, std, device)
    try:
        x, y = random_batch(batch_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup, iters = bench.warmup_iters, bench.timed_iters
        train_s = timed(lambda: step(x, y, None, train.lr), device, warmup, iters, ROW_BUDGET_S)
        infer_s = timed(
            lambda: predict_batches(model, [x], mean, std, device, bf16),
            device,
            warmup,
            iters,
            ROW_BUDGET_S,
        )
        row.update(train_step_s=train_s, train_img_s=rate(batch_size, train_s))
        row.update(infer_batch_s=infer_s, infer_img_s=rate(batch_size, infer_s))
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        row.update(out_of_memory_row(error))
        log.warning(
            "benchmark %s %s batch %d: out of memory (recorded as a result)",
            device.type,
            precision,
            batch_size,
        )
    finally:
        step.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def latency(
    model: nn.Module, device: torch.device, bf16: bool, bench: BenchmarkParams
) -> dict[str, float]:
    """Batch-1 inference latency percentiles (ms), each call synchronised."""
    x, _ = random_batch(1, device)
    mean, std = normalisation(RANDOM_PATCH_STATS, device)
    samples = []
    for i in range(bench.warmup_iters + bench.latency_iters):
        synchronize(device)
        start = time.perf_counter()
        predict_batches(model, [x], mean, std, device, bf16)
        synchronize(device)
        if i >= bench.warmup_iters:
            samples.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p95_ms": float(np.percentile(samples, 95)),
    }


def time_models(params: Params) -> dict[str, Any]:
    """The model table: every device, precision and batch size of `benchmark`, where the
    stages would run them (on the CPU they never use bf16: that pair is skipped, and said so)."""
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
            bf16 = precision == "bf16"
            if bf16 and not uses_bf16(bf16, device):
                skipped.append(f"{device_name} bf16: train and evaluate never use bf16 there")
                continue
            train = params.train.model_copy(update={"bf16": bf16, "compile": "off"})
            torch.manual_seed(0)
            model = prepare_model(train, device)
            for batch_size in bp.batch_sizes:
                at_size = train.model_copy(update={"batch_size": batch_size})
                rows.append(time_model(model, at_size, bp, device))
            latencies[f"{device_name}_{precision}"] = latency(model, device, bf16, bp)
            del model
    return {"rows": rows, "latency_batch1": latencies, "skipped": skipped}


def train_feed(
    dataset: ProcessedData, params: Params, device: torch.device
) -> tuple[DeviceBatches, torch.Tensor, torch.Tensor]:
    """The train split on `device` as `pcam train` feeds it, with its channel statistics."""
    split = Split.open(dataset.split_path("train"), params.loader)
    mean, std = dataset.normalisation(device)
    return DeviceBatches(split, device, params.loader), mean, std


def time_loops(params: Params) -> dict[str, Any]:
    """The loop table: per batch size and precision, on train's device with its data and
    compile mode. On the CPU train never uses bf16, so only fp32 is timed."""
    bp = params.benchmark
    device = resolve_device(params.train.device)
    feeder, mean, std = train_feed(processed_data(), params, device)
    precisions = bp.precisions if device.type == "cuda" else ["fp32"]
    rows = []
    for precision in precisions:
        for batch_size in bp.batch_sizes:
            update = {"batch_size": batch_size, "bf16": precision == "bf16"}
            train = params.train.model_copy(update=update)
            row = time_loop(train, params.loader, feeder, mean, std, bp.warmup_iters, LOOP_BUDGET_S)
            if row.get("oom"):
                log.warning(
                    "benchmark loop %s %s batch %d: out of memory (recorded as a result)",
                    device.type,
                    precision,
                    batch_size,
                )
            rows.append(row)
    return {"rows": rows, "feeder": feeder.mode, "feeder_note": feeder.note}


def architecture(train: TrainParams, entry: str) -> TrainParams:
    """train's params with the model of a `benchmark.models` entry (its other settings kept)."""
    if entry == "train":
        return train
    if entry in ("cnn", "mlp"):
        return train.model_copy(update={"model": entry})
    timm = train.timm.model_copy(update={"name": entry, "pretrained": None})
    return train.model_copy(update={"model": "timm", "timm": timm})


def time_architectures(params: Params) -> dict[str, Any]:
    """The architecture table: per `benchmark.models` entry, its parameter count and its
    training loop (train's device, batch size, precision and compile mode) end to end against
    resident data. Random weights: pretrained ones cost the same time."""
    device = resolve_device(params.train.device)
    feeder, mean, std = train_feed(processed_data(), params, device)
    rows = []
    for entry in params.benchmark.models:
        train = architecture(params.train, entry)
        name = train.timm.name if train.model == "timm" else train.model
        parameters = sum(p.numel() for p in build_model(train).parameters())
        row = time_loop(
            train, params.loader, feeder, mean, std, params.benchmark.warmup_iters, LOOP_BUDGET_S
        )
        rows.append({"model": name, "parameters": parameters, **row})
    return {"rows": rows}
