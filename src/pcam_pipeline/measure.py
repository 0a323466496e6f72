"""Measurement helpers shared by the benchmark stage and `pcam_pipeline.perf`: one median, one
peak-memory reader, one timed call, one pass over a split as the training loop reads it, and the
training loop itself timed end to end against its step on resident data."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.params import LoaderParams, TrainParams
from pcam_pipeline.runtime import uses_bf16
from pcam_pipeline.training import Loop, RunningSums, resident_batches


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    budget_s: float,
) -> float:
    """Seconds per call: up to `warmup` untimed calls, then up to `iters` timed ones, each phase
    cut short (after at least one call) once `budget_s` has passed; synchronised on CUDA."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start > budget_s:
            break
    synchronize(device)
    start = time.perf_counter()
    done = 0
    while done < iters:
        fn()
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    synchronize(device)
    return (time.perf_counter() - start) / done


def loader_epoch(split: Split, batch_size: int, seed: int) -> int:
    """One epoch of the uint8 batches the training loop receives; returns the patch count."""
    seen = 0
    for x, _ in split.batches(split.epoch_order(torch.Generator().manual_seed(seed)), batch_size):
        seen += len(x)
    return seen


PCAM_TRAIN_PATCHES = 262_144  # one epoch of the real PCAM train split


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError for the same thing."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


def time_training_loop(
    train: TrainParams,
    loader: LoaderParams,
    feeder: DeviceBatches,
    mean: torch.Tensor,
    std: torch.Tensor,
    warmup_steps: int,
    budget_s: float,
    ddp: bool = False,
) -> dict[str, Any]:
    """The training loop `pcam train` runs, fed by the real loader (end to end), against the
    same step on batches already on the device (resident), with `train`'s batch size,
    precision and compile mode.

    End to end is `Loop.run` over an epoch of the split (its order, augmentation codes and
    feeding included), stopped once `budget_s` has passed; resident is the same number of
    steps of the same `TrainStep`, with its running sums, on batches already on the device:
    what differs is the loader alone. fed_fraction is end to end
    over resident: the share of the step's own speed the whole loop keeps. Out of memory is
    a result, not an error. `ddp`: the model wrapped in DistributedDataParallel (in a process
    group of one, already initialised), to measure the wrapper's cost.
    """
    device = feeder.device
    row: dict[str, Any] = {
        "device": device.type,
        "precision": "bf16" if uses_bf16(train.bf16, device) else "fp32",
        "batch_size": train.batch_size,
        "compile": train.compile,
        "feeder": feeder.mode,
        "ddp": ddp,
    }
    try:
        torch.manual_seed(train.seed)
        loop = Loop(train, loader, feeder.split, mean, std, device, feeder=feeder, ddp=ddp)
        # Warm-up (and compilation): a few steps of an epoch, untimed.
        started = time.perf_counter()
        warm_steps = max(warmup_steps, 1)
        loop.run(0, 0, RunningSums(device), should_stop=_after_steps(warm_steps))
        synchronize(device)
        row["warmup_s"] = time.perf_counter() - started

        sums = RunningSums(device)
        deadline = time.perf_counter() + budget_s
        start = time.perf_counter()
        loop.run(1, 0, sums, should_stop=lambda: time.perf_counter() > deadline)
        synchronize(device)
        seconds = time.perf_counter() - start
        steps, seen = sums.steps, sums.seen
        row["end_to_end_img_s"] = rate(seen, seconds)

        resident = list(resident_batches(loop, train.batch_size, steps))
        for x, y, codes in resident[: min(warm_steps, len(resident))]:
            loop.step(x, y, codes, train.lr)
        resident_sums = RunningSums(device)
        synchronize(device)
        start = time.perf_counter()
        for x, y, codes in resident:
            total, correct, grad_norm = loop.step(x, y, codes, train.lr)
            resident_sums.add(total, correct, len(y), grad_norm)
        synchronize(device)
        row["resident_img_s"] = rate(steps * train.batch_size, time.perf_counter() - start)
        row["fed_fraction"] = row["end_to_end_img_s"] / row["resident_img_s"]
        row["pcam_epoch_s"] = PCAM_TRAIN_PATCHES / row["end_to_end_img_s"]
        row["steps"] = steps
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        row.update(oom=1, error=f"out of memory: {str(error).splitlines()[0][:200]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _after_steps(count: int) -> Callable[[], bool]:
    done = [0]

    def should_stop() -> bool:
        done[0] += 1
        return done[0] >= count

    return should_stop
