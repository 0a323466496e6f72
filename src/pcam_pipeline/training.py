"""The training loop, shared by the train stage and the benchmark, so the benchmark times
exactly what `pcam train` runs.

A step takes a uint8 batch that is already on the device and never makes the host wait for the
device: the symmetry codes of the augmentation and the epoch's order are drawn on the CPU from
seeded generators and sent over once per epoch, the loss, accuracy and gradient-norm sums stay
on the device (read once per epoch, and every few seconds for a progress bar), and gradient
clipping scales by a device tensor. On the CPU the numbers are bit-identical to summing
`.item()`s in Python: the same float64 additions in the same order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pcam_pipeline.data.loader import (
    DeviceBatches,
    Split,
    apply_symmetries,
    epoch_generator,
    normalise,
    symmetry_codes,
    symmetry_tables,
)
from pcam_pipeline.models import INPUT_SHAPE, build_model
from pcam_pipeline.params import LoaderParams, TrainParams
from pcam_pipeline.runtime import uses_bf16, uses_channels_last

log = logging.getLogger(__name__)
SUM_KEYS = ("loss", "correct", "seen", "grad_norm", "steps")
PROGRESS_SECONDS = 2.0  # a progress bar reads the device's sums at most this often


def lr_factor(params: TrainParams, step: int, steps_per_epoch: int) -> float:
    """Multiplier of train.lr at a global step: warm-up, then the chosen schedule."""
    total = params.epochs * steps_per_epoch
    warmup = params.warmup_epochs * steps_per_epoch
    if params.schedule == "onecycle":
        peak = max(int(0.3 * total), 1)
        if step < peak:
            return 0.04 + 0.96 * step / peak
        decay = (step - peak) / max(total - peak, 1)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * decay))
    if step < warmup:
        return (step + 1) / warmup
    if params.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    if params.schedule == "step":
        return params.gamma ** ((step - warmup) // (params.step_size * steps_per_epoch))
    return 1.0  # constant, and plateau (whose decay is applied per epoch)


def build_optimizer(
    model: nn.Module, params: TrainParams, device: torch.device
) -> torch.optim.Optimizer:
    # On CUDA the fused kernels: one launch per step, and the step count stays on the device.
    # On the CPU PyTorch's default implementation, whose results the CPU tests pin.
    fused = True if device.type == "cuda" else None
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            nesterov=True,
            fused=fused,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=fused
    )


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that make both classes equally likely under WeightedRandomSampler."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return (1.0 / np.maximum(counts, 1))[labels]


def epoch_codes(params: TrainParams, epoch: int, length: int) -> torch.Tensor | None:
    """The symmetry codes of every patch position of an epoch, batch by batch.

    Batch b's codes come from its own generator, seeded by (seed, epoch, b), so a run resumed
    at any batch draws exactly what an unbroken run draws.
    """
    flags, size = params.augment, params.batch_size
    parts = []
    for batch, start in enumerate(range(0, length, size)):
        generator = epoch_generator(params.seed, epoch, salt=1 + batch)
        codes = symmetry_codes(generator, min(size, length - start), flags.flip, flags.rot90)
        if codes is None:
            return None
        parts.append(codes)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class RunningSums:
    """An epoch's running sums: loss x batch size, correct predictions and gradient norm on the
    device in float64, so adding a step's values never waits for it; counts on the host."""

    def __init__(self, device: torch.device, start: dict[str, float] | None = None) -> None:
        start = start or dict.fromkeys(SUM_KEYS, 0.0)
        self.on_device = torch.tensor(
            [start["loss"], start["correct"], start["grad_norm"]], dtype=torch.float64
        ).to(device)
        self.seen, self.steps = int(start["seen"]), int(start["steps"])

    def add(
        self, loss: torch.Tensor, correct: torch.Tensor, n: int, grad_norm: torch.Tensor
    ) -> None:
        step = torch.stack((loss.detach().double() * n, correct.double(), grad_norm.double()))
        self.on_device += step
        self.seen += n
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The sums as Python floats (waits for the device)."""
        loss, correct, grad_norm = self.on_device.tolist()
        return {
            "loss": loss,
            "correct": correct,
            "seen": float(self.seen),
            "grad_norm": grad_norm,
            "steps": float(self.steps),
        }


class TrainStep:
    """One optimisation step on a uint8 (B,96,96,3) batch already on the device.

    Augment (one gather), normalise, forward under bf16 autocast where asked, loss; backward,
    clip, optimiser step. With `train.compile` the part up to the loss is one `torch.compile`d
    graph (its backward compiled with it); `reduce-overhead` replays both as CUDA graphs. The
    optimiser runs eagerly: on CUDA it is the fused kernel, one launch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: TrainParams,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.model, self.optimizer, self.params = model, optimizer, params
        self.mean, self.std, self.device = mean, std, device
        self.bf16 = uses_bf16(params.bf16, device)
        self.channels_last = uses_channels_last(device)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.max_norm = params.grad_clip if params.grad_clip > 0 else float("inf")
        self.tables = symmetry_tables(INPUT_SHAPE[1], device)
        self.forward_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._forward_loss
        if params.compile != "off":
            # dynamic=False: one graph per batch shape (the full batch and an epoch's last).
            self.forward_loss = torch.compile(
                self._forward_loss, mode=params.compile, dynamic=False
            )

    def _forward_loss(
        self, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        turned = apply_symmetries(x, codes, self.tables)
        images = normalise(turned, self.mean, self.std, self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(images)
        target = y.float()
        loss = self.loss_fn(logits.float(), target)
        # Compared as floats: Inductor's CPU code cannot compare a float mask with a byte one.
        correct = ((logits.detach() > 0).float() == target).sum()
        return loss, correct

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor | None, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, correct count, gradient norm before clipping), all on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, correct = self.forward_loss(x, y, codes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        return loss, correct, grad_norm


class Loop:
    """A model, its optimiser and its step, fed from a split: the epoch `pcam train` runs."""

    def __init__(
        self,
        params: TrainParams,
        loader: LoaderParams,
        split: Split,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
        feeder: DeviceBatches | None = None,
    ) -> None:
        self.params, self.split, self.device = params, split, device
        self.model = build_model(params).to(device)
        if uses_channels_last(device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, params, device)
        self.step = TrainStep(self.model, self.optimizer, params, mean, std, device)
        # A feeder may be shared (the benchmark's loops): the split goes to the GPU once.
        self.feeder = feeder or DeviceBatches(split, device, loader)
        self.steps_per_epoch = -(-split.length // params.batch_size)
        self.weights = class_weights(split.labels) if params.balanced_sampler else None

    def run(
        self,
        epoch: int,
        start_batch: int,
        sums: RunningSums,
        lr_scale: float = 1.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Train from `start_batch` of `epoch` to the epoch's end, or until `should_stop()`
        after a batch; return the number of batches of the epoch done."""
        tp = self.params
        order = self.split.epoch_order(epoch_generator(tp.seed, epoch), self.weights)
        codes = epoch_codes(tp, epoch, len(order))
        if codes is not None:
            codes = codes.to(self.device, non_blocking=True)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start_batch,
            leave=False,
            desc=f"epoch {epoch + 1}/{tp.epochs}",
            disable=None,
        )
        debug = log.isEnabledFor(logging.DEBUG)
        shown, last_shown = start_batch, time.monotonic()
        batch = start_batch
        try:
            for x, y in self.feeder.batches(order, tp.batch_size, start_batch):
                step = epoch * self.steps_per_epoch + batch
                lr = tp.lr * lr_factor(tp, step, self.steps_per_epoch) * lr_scale
                start = batch * tp.batch_size
                part = None if codes is None else codes[start : start + len(y)]
                loss, correct, grad_norm = self.step(x, y, part, lr)
                sums.add(loss, correct, len(y), grad_norm)
                batch += 1
                if debug:  # -v: one line per batch, which waits for the device
                    log.debug(
                        "epoch %d batch %d/%d loss %.4f",
                        epoch + 1,
                        batch,
                        self.steps_per_epoch,
                        loss.item(),
                    )
                if not bar.disable and time.monotonic() - last_shown >= PROGRESS_SECONDS:
                    read = sums.read()
                    bar.set_postfix(loss=f"{read['loss'] / max(read['seen'], 1):.4f}")
                    bar.update(batch - shown)
                    shown, last_shown = batch, time.monotonic()
                if should_stop():
                    break
        finally:
            bar.close()
        return batch


def resident_batches(
    loop: Loop, batch_size: int, count: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """`count` batches already on the device (a few distinct ones, cycled), with their codes:
    the step's input with no loader in front of it, for the benchmark's ceiling."""
    generator = torch.Generator().manual_seed(seed)
    distinct = []
    for _ in range(min(count, 4)):
        index = torch.randint(0, loop.split.length, (batch_size,), generator=generator)
        x, y = next(loop.split.batches(index, batch_size))
        flags = loop.params.augment
        codes = symmetry_codes(generator, batch_size, flags.flip, flags.rot90)
        distinct.append(
            (
                x.to(loop.device),
                y.to(loop.device),
                None if codes is None else codes.to(loop.device),
            )
        )
    for i in range(count):
        yield distinct[i % len(distinct)]
