"""The training loop, shared by the train stage and the benchmark, so the benchmark times
exactly what `pcam train` runs.

A step takes a uint8 batch that is already on the device and never makes the host wait for the
device: the symmetry codes of the augmentation and the epoch's order are drawn on the CPU from
seeded generators and sent over once per epoch, the loss, accuracy and gradient-norm sums stay
on the device (read once per epoch, and every few seconds for a progress bar), and gradient
clipping scales by a device tensor. On the CPU the numbers are bit-identical to summing
`.item()`s in Python: the same float64 additions in the same order.

With portable CPU numerics (`cpu.numerics`, see numerics.py) a CPU run computes the same bits
on any x86-64 CPU with AVX2 and for any thread count: the convolutions' weight gradients are
summed on one thread (`portable_convolutions`) and the optimisers are PyTorch's fused kernels.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pcam_pipeline import numerics
from pcam_pipeline.data.loader import (
    DeviceBatches,
    Split,
    apply_symmetries,
    epoch_generator,
    normalise,
    symmetry_codes,
    symmetry_tables,
)
from pcam_pipeline.models.architectures import INPUT_SHAPE, TimmModel, build_model
from pcam_pipeline.models.pretrained import load_pretrained
from pcam_pipeline.params import LoaderParams, TrainParams
from pcam_pipeline.runtime import uses_bf16, uses_channels_last
from pcam_pipeline.train.distributed import SINGLE, World

log = logging.getLogger(__name__)
SUM_KEYS = ("loss", "correct", "seen", "grad_norm", "steps")
PROGRESS_SECONDS = 2.0  # a progress bar reads the device's sums at most this often


# --- the learning-rate schedule ----------------------------------------------------------------


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
    return 1.0  # constant, and plateau (whose decay is the Plateau's scale, set per epoch)


@dataclass(frozen=True)
class Plateau:
    """The plateau schedule between epochs: the factor it has decayed train.lr by so far, and
    how many epochs in a row val_loss has not improved on the best before it."""

    scale: float = 1.0
    bad_epochs: int = 0

    def after_epoch(self, params: TrainParams, val_loss: float, earlier: list[float]) -> Plateau:
        """The state for the next epoch, given this epoch's val_loss and the earlier epochs'.

        After train.plateau_patience epochs in a row without a new best, train.lr is decayed by
        train.gamma and the count starts again. Other schedules never decay.
        """
        if params.schedule != "plateau":
            return self
        if not earlier or not val_loss >= min(earlier):  # a new best (NaN never counts as bad)
            return Plateau(self.scale, 0)
        if self.bad_epochs + 1 < params.plateau_patience:
            return Plateau(self.scale, self.bad_epochs + 1)
        return Plateau(self.scale * params.gamma, 0)


def learning_rate(params: TrainParams, step: int, steps_per_epoch: int, plateau: Plateau) -> float:
    """train.lr at a global step: the schedule's factor, then the plateau decay so far."""
    return params.lr * lr_factor(params, step, steps_per_epoch) * plateau.scale


# --- the step and the epoch -----------------------------------------------------------------------


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """PyTorch's fused optimiser kernels on every device. On CUDA: one launch per step, and the
    step count stays on the device. On the CPU: the exact `sqrt` instruction, where the
    for-loop AdamW takes MKL's vector square root, whose last bits differ between CPU vendors."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            nesterov=True,
            fused=True,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True
    )


def portable_convolutions(model: nn.Module) -> nn.Module:
    """Make every Conv2d of `model` sum its weight and bias gradients on one thread.

    oneDNN splits that sum over the minibatch when it has more threads than output-channel
    blocks and adds the parts in another order, so 4 threads trained other weights than 2. The
    forward pass and the input gradient never split a sum and keep every thread. The modules'
    parameters and state are unchanged. Costs 0.91x of the CPU step at batch 64 on 2 cores
    (docs/performance.md).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module._conv_forward = types.MethodType(_portable_conv_forward, module)  # type: ignore[method-assign]
    return model


def _portable_conv_forward(
    self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.device.type != "cpu" or not (weight.requires_grad and torch.is_grad_enabled()):
        return nn.Conv2d._conv_forward(self, x, weight, bias)
    padding = self.padding
    if self.padding_mode != "zeros" or isinstance(padding, str):
        # Pad explicitly, as Conv2d does for the other modes: the backward needs numbers.
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        x = nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    geometry = ConvGeometry(list(self.stride), list(padding), list(self.dilation), self.groups)
    return SingleThreadWeightGrad.apply(x, weight, bias, geometry)


@dataclass(frozen=True)
class ConvGeometry:
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


class SingleThreadWeightGrad(torch.autograd.Function):
    """conv2d whose weight and bias gradients are computed with one thread."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: ConvGeometry,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        g = geometry
        return nn.functional.conv2d(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g: ConvGeometry = ctx.geometry
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]

        def gradients(mask: list[bool]) -> tuple[torch.Tensor, ...]:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            return torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, g.stride, g.padding, g.dilation, False, [0, 0],
                g.groups, mask,
            )  # fmt: skip

        grad_input = gradients([True, False, False])[0] if needs_input else None
        grad_weight = grad_bias = None
        if needs_weight or needs_bias:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                _, grad_weight, grad_bias = gradients([False, needs_weight, needs_bias])
            finally:
                torch.set_num_threads(threads)
        return grad_input, grad_weight, grad_bias, None


def prepare_model(params: TrainParams, device: torch.device) -> nn.Module:
    """The model of `params` on `device`, as the training loop runs it: with portable CPU
    numerics its convolutions sum their weight gradients on one thread (eager only), on CUDA it
    is channels_last. A timm model starts from `train.timm.pretrained` when it names a file."""
    model = build_model(params)
    if isinstance(model, TimmModel) and params.timm.pretrained is not None:
        load_pretrained(model.net, Path(params.timm.pretrained))
    model = model.to(device)
    if device.type == "cpu" and params.compile == "off" and numerics.active() == "portable":
        portable_convolutions(model)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model


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
        self, loss_total: torch.Tensor, correct: torch.Tensor, n: int, grad_norm: torch.Tensor
    ) -> None:
        """One step: its loss summed over its `n` patches (float64), correct count, grad norm."""
        step = torch.stack((loss_total, correct.double(), grad_norm.double()))
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
        world_size: int = 1,
    ) -> None:
        self.model, self.optimizer, self.params = model, optimizer, params
        self.world_size = world_size
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
        self, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor | None, global_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        turned = apply_symmetries(x, codes, self.tables)
        images = normalise(turned, self.mean, self.std, self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(images)
        target = y.float()
        if self.world_size == 1:
            loss = self.loss_fn(logits.float(), target)
            total = loss.detach().double() * len(y)
        else:
            # This worker's share of the global batch's mean: DDP averages the gradients over
            # the workers, so the sum over this shard times (workers / global batch) makes the
            # update that of the whole batch's mean loss, whatever the shards' sizes.
            summed = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), target, reduction="sum"
            )
            loss = summed * (self.world_size / global_size)
            total = summed.detach().double()
        # Compared as floats: Inductor's CPU code cannot compare a float mask with a byte one.
        correct = ((logits.detach() > 0).float() == target).sum()
        return loss, total, correct

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        codes: torch.Tensor | None,
        lr: float,
        global_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss summed over the batch in float64, correct count, gradient norm before
        clipping), all on the device. `global_size`: the global batch this one is a shard of."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, total, correct = self.forward_loss(x, y, codes, global_size or len(y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        return total, correct, grad_norm


def shard_positions(length: int, batch_size: int, world: World) -> tuple[torch.Tensor, list[int]]:
    """This worker's positions in an epoch's order, and the global batch size of each step.

    Global batch i is `order[i * batch_size:(i + 1) * batch_size]`, as in one process; worker r
    takes its r-th contiguous part (`batch_size / workers` patches; of a short last batch of L
    patches, `L * r // workers` to `L * (r + 1) // workers`), so the workers together see
    exactly the patches one process sees, in the same steps. A last batch smaller than the
    number of workers is dropped (a worker cannot take an empty step).
    """
    parts, sizes = [], []
    for start in range(0, length, batch_size):
        size = min(batch_size, length - start)
        if size < world.size:
            break
        lo = start + size * world.rank // world.size
        hi = start + size * (world.rank + 1) // world.size
        parts.append(torch.arange(lo, hi))
        sizes.append(size)
    return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)), sizes


class StepLog:
    """Every `every` optimiser steps: the step (counted from 1), its learning rate and its
    gradient norm before clipping. The norms stay on the device until `read`: reading waits
    for the device, so it happens once per epoch, not once per step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.norms: list[torch.Tensor] = []

    def add(self, step: int, lr: float, grad_norm: torch.Tensor) -> None:
        if self.every and step % self.every == 0:
            self.steps.append(step)
            self.lrs.append(lr)
            self.norms.append(grad_norm.detach())

    def read(self) -> list[dict[str, float]]:
        norms = torch.stack(self.norms).double().tolist() if self.norms else []
        rows = [
            {"step": step, "grad_norm": norm, "lr": lr}
            for step, norm, lr in zip(self.steps, norms, self.lrs, strict=True)
        ]
        self.steps, self.lrs, self.norms = [], [], []
        return rows


class EpochBar:
    """An epoch's progress bar, on worker 0 in a terminal. It shows the running loss, read from
    the device at most every PROGRESS_SECONDS: reading it waits for the device."""

    def __init__(self, description: str, steps: int, start: int, world: World) -> None:
        disable = None if world.is_main else True  # None: tqdm shows it on a terminal only
        self.bar = tqdm(total=steps, initial=start, leave=False, desc=description, disable=disable)
        self.shown, self.last_shown = start, time.monotonic()

    def show(self, batch: int, sums: RunningSums) -> None:
        if self.bar.disable or time.monotonic() - self.last_shown < PROGRESS_SECONDS:
            return
        read = sums.read()
        self.bar.set_postfix(loss=f"{read['loss'] / max(read['seen'], 1):.4f}")
        self.bar.update(batch - self.shown)
        self.shown, self.last_shown = batch, time.monotonic()

    def close(self) -> None:
        self.bar.close()


class Loop:
    """A model, its optimiser and its step, fed from a split: the epoch `pcam train` runs.

    With several workers (`world`), the model is wrapped in DistributedDataParallel and each
    worker trains on its shard of every global batch (`shard_positions`); `train.batch_size`
    stays the global batch, so 1, 2 or 4 workers see the same patches in the same steps.
    """

    def __init__(
        self,
        params: TrainParams,
        loader: LoaderParams,
        split: Split,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
        feeder: DeviceBatches | None = None,
        world: World = SINGLE,
        ddp: bool | None = None,
    ) -> None:
        """`ddp`: wrap the model in DistributedDataParallel (default: with several workers;
        True with one measures what the wrapper costs)."""
        self.params, self.split, self.device, self.world = params, split, device, world
        if world.distributed and params.batch_size % world.size:
            raise ValueError(
                f"train.batch_size {params.batch_size} is the global batch and must divide "
                f"evenly over {world.size} training processes; use a multiple of {world.size}"
            )
        self.model = prepare_model(params, device)
        trained: nn.Module = self.model
        if world.distributed if ddp is None else ddp:
            trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = build_optimizer(self.model, params)
        self.step = TrainStep(trained, self.optimizer, params, mean, std, device, world.size)
        # A feeder may be shared (the benchmark's loops): the split goes to the GPU once.
        self.feeder = feeder or DeviceBatches(split, device, loader)
        self.steps_per_epoch = len(shard_positions(split.length, params.batch_size, world)[1])
        self.weights = class_weights(split.labels) if params.balanced_sampler else None

    def run(
        self,
        epoch: int,
        start_batch: int,
        sums: RunningSums,
        plateau: Plateau = Plateau(),
        should_stop: Callable[[], bool] = lambda: False,
        step_log: StepLog | None = None,
    ) -> int:
        """Train from `start_batch` of `epoch` to the epoch's end, or until `should_stop()`
        after a batch; return the number of batches of the epoch done. `step_log` records
        every few steps' gradient norm and learning rate."""
        tp, world = self.params, self.world
        order = self.split.epoch_order(epoch_generator(tp.seed, epoch), self.weights)
        codes = epoch_codes(tp, epoch, len(order))
        batch_size, global_sizes = tp.batch_size, None
        if world.distributed:
            positions, global_sizes = shard_positions(len(order), tp.batch_size, world)
            order = order[positions]
            codes = None if codes is None else codes[positions]
            batch_size = tp.batch_size // world.size
        if codes is not None:
            codes = codes.pin_memory() if self.device.type == "cuda" else codes
            codes = codes.to(self.device, non_blocking=True)
        bar = EpochBar(f"epoch {epoch + 1}/{tp.epochs}", self.steps_per_epoch, start_batch, world)
        debug = log.isEnabledFor(logging.DEBUG)
        batch = start_batch
        try:
            for x, y in self.feeder.batches(order, batch_size, start_batch):
                if batch >= self.steps_per_epoch:
                    break  # a dropped last batch (see shard_positions)
                step = epoch * self.steps_per_epoch + batch
                lr = learning_rate(tp, step, self.steps_per_epoch, plateau)
                start = batch * batch_size
                part = None if codes is None else codes[start : start + len(y)]
                global_size = None if global_sizes is None else global_sizes[batch]
                total, correct, grad_norm = self.step(x, y, part, lr, global_size)
                sums.add(total, correct, len(y), grad_norm)
                if step_log is not None:
                    step_log.add(step + 1, lr, grad_norm)
                batch += 1
                if debug:  # -v: one line per batch, which waits for the device
                    log.debug(
                        "epoch %d batch %d/%d loss %.4f",
                        epoch + 1,
                        batch,
                        self.steps_per_epoch,
                        total.item() / len(y),
                    )
                bar.show(batch, sums)
                if should_stop():
                    break
        finally:
            bar.close()
        return batch

    def trial_step(self) -> None:
        """One optimisation step at this worker's share of train.batch_size on made-up patches,
        then the model, optimiser and random generators put back as they were: it proves the
        step fits the device's memory (the compiled graph too) and changes nothing the run
        computes. Parameters and buffers are restored in place, so the tensors a compiled graph
        or a CUDA graph holds stay the ones the run trains."""
        tp = self.params
        size = tp.batch_size // self.world.size
        model_state = {
            name: t.detach().to("cpu", copy=True) for name, t in self.model.state_dict().items()
        }
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        generator = torch.Generator().manual_seed(tp.seed)
        x = torch.randint(0, 256, (size, *INPUT_SHAPE[1:], INPUT_SHAPE[0]), generator=generator)
        y = torch.randint(0, 2, (size,), generator=generator)
        flags = tp.augment
        codes = symmetry_codes(generator, size, flags.flip, flags.rot90)
        x, y = x.to(torch.uint8).to(self.device), y.to(torch.uint8).to(self.device)
        codes = None if codes is None else codes.to(self.device)
        try:
            # reduce-overhead records its CUDA graphs on the second call (the first warms up),
            # and the graphs' memory pool is what may not fit: run until it is recorded.
            for _ in range(2 if tp.compile == "reduce-overhead" else 1):
                self.step(x, y, codes, 0.0, tp.batch_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, tensor in self.model.state_dict().items():
                    tensor.copy_(model_state[name])
            self.optimizer.load_state_dict(optimizer_state)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def prove_fit(
    trial: Callable[[], None],
    memory: Callable[[], tuple[int | None, int | None]],
    error: Callable[[int | None, int | None, str], Exception],
) -> None:
    """Run `trial` (a step at train.batch_size); when the device runs out of memory, raise
    `error(free, total, what CUDA said)` with the memory found after it, instead of the
    traceback. Pure of devices, so a test drives it with a simulated out-of-memory."""
    try:
        trial()
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc)
        del exc  # its traceback holds the frames' tensors: free them before measuring
        free, total = memory()
        raise error(free, total, message) from None


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
