"""Timing torch work: a call synchronised with its device, an epoch of the loader, and the
training loop `pcam train` runs, end to end against its own step on data already on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pcam_pipeline.bench.measure import PCAM_TRAIN_PATCHES, rate
from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.params import LoaderParams, TrainParams
from pcam_pipeline.runtime import uses_bf16
from pcam_pipeline.train.loop import Loop, RunningSums, resident_batches


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


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError for the same thing."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


def out_of_memory_row(error: BaseException) -> dict[str, Any]:
    """What a measurement that ran out of memory records, in place of its figures."""
    return {"oom": 1, "error": f"out of memory: {str(error).splitlines()[0][:200]}"}


def loader_epoch(split: Split, batch_size: int, seed: int) -> int:
    """One epoch of the uint8 batches the training loop receives; returns the patch count."""
    seen = 0
    for x, _ in split.batches(split.epoch_order(torch.Generator().manual_seed(seed)), batch_size):
        seen += len(x)
    return seen


def after_steps(count: int) -> Callable[[], bool]:
    """A `should_stop` for `Loop.run` that stops after `count` steps."""
    done = [0]

    def should_stop() -> bool:
        done[0] += 1
        return done[0] >= count

    return should_stop


def end_to_end(loop: Loop, budget_s: float) -> tuple[RunningSums, float]:
    """An epoch of `loop` (its order, augmentation codes and feeding included), stopped once
    `budget_s` has passed: its sums and seconds."""
    sums = RunningSums(loop.device)
    deadline = time.perf_counter() + budget_s
    start = time.perf_counter()
    loop.run(1, 0, sums, should_stop=lambda: time.perf_counter() > deadline)
    synchronize(loop.device)
    return sums, time.perf_counter() - start


def resident(loop: Loop, train: TrainParams, steps: int, warm_steps: int) -> float:
    """Seconds of `steps` steps of the loop's own TrainStep, with its running sums, on batches
    already on the device: what the loop would take with a loader that cost nothing."""
    batches = list(resident_batches(loop, train.batch_size, steps))
    for x, y, codes in batches[: min(warm_steps, len(batches))]:
        loop.step(x, y, codes, train.lr)
    sums = RunningSums(loop.device)
    synchronize(loop.device)
    start = time.perf_counter()
    for x, y, codes in batches:
        total, correct, grad_norm = loop.step(x, y, codes, train.lr)
        sums.add(total, correct, len(y), grad_norm)
    synchronize(loop.device)
    return time.perf_counter() - start


def time_loop(
    train: TrainParams,
    loader: LoaderParams,
    feeder: DeviceBatches,
    mean: torch.Tensor,
    std: torch.Tensor,
    warmup_steps: int,
    budget_s: float,
    ddp: bool = False,
) -> dict[str, Any]:
    """The training loop `pcam train` runs, with `train`'s batch size, precision and compile
    mode, fed by the real loader (end to end), against the same number of steps of the same
    `TrainStep` on resident batches: what differs is the loader alone.

    fed_fraction is end to end over resident: the share of the step's own speed the whole loop
    keeps. Out of memory is a result, not an error. `ddp`: the model wrapped in
    DistributedDataParallel (in a process group of one, already initialised), to measure the
    wrapper's cost.
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
        warm_steps = max(warmup_steps, 1)
        started = time.perf_counter()  # warm-up (and compilation): untimed steps of an epoch
        loop.run(0, 0, RunningSums(device), should_stop=after_steps(warm_steps))
        synchronize(device)
        row["warmup_s"] = time.perf_counter() - started
        sums, seconds = end_to_end(loop, budget_s)
        resident_s = resident(loop, train, sums.steps, warm_steps)
        row.update(steps=sums.steps, seen=sums.seen, end_to_end_s=seconds, resident_s=resident_s)
        row["end_to_end_img_s"] = rate(sums.seen, seconds)
        row["resident_img_s"] = rate(sums.steps * train.batch_size, resident_s)
        row["fed_fraction"] = row["end_to_end_img_s"] / row["resident_img_s"]
        row["pcam_epoch_s"] = PCAM_TRAIN_PATCHES / row["end_to_end_img_s"]
        if device.type == "cuda":
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        row.update(out_of_memory_row(error))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row
