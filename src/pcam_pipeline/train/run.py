"""One training run for the train stage: the loop of loop.py, its progress, validation and
checkpoints, from the first epoch or from models/last.pt to the last epoch.

Everything random is drawn from generators seeded by (train.seed, epoch, batch), so an epoch's
order and augmentations do not depend on what ran before; the global torch RNG (dropout) is
saved in every checkpoint. That makes a run stopped by SIGUSR1/SIGTERM (Slurm's warning before
the time limit) and resumed from models/last.pt end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.errors import PipelineError, Preempted
from pcam_pipeline.evaluation.metrics import auroc
from pcam_pipeline.inference import predict_split
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BEST_CHECKPOINT, LAST_CHECKPOINT
from pcam_pipeline.repro import seed_everything
from pcam_pipeline.runtime import (
    data_dir,
    memory_found,
    out_of_memory_error,
    processed_data,
    resolve_device,
    uses_bf16,
)
from pcam_pipeline.train import distributed
from pcam_pipeline.train.distributed import SINGLE, World
from pcam_pipeline.train.loop import Loop, Plateau, RunningSums, StepLog, prove_fit
from pcam_pipeline.train.preemption import StopFlag
from pcam_pipeline.train.resume import (
    CHECKPOINT_FORMAT,
    Progress,
    fingerprint,
    recorded_params,
    resume_point,
    resumed_steps,
    rng_state,
    save_steps,
    save_with_record,
    set_rng_state,
)

log = logging.getLogger(__name__)
STOP_CHECK_STEPS = 25  # CUDA workers agree on stopping every this many steps


def split_order(split: Split) -> str:
    return "memory" if split.in_memory else f"stream:{split.params.block_patches}"


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if metric == "val_loss" else value > best


def evaluate_split(
    model: nn.Module,
    split: DeviceBatches,
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool,
) -> dict[str, float]:
    probs = predict_split(model, split, mean, std, 256, bf16)
    labels = split.split.labels.astype(np.float64)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    return {
        "val_loss": loss,
        "val_accuracy": float(((probs >= 0.5) == labels).mean()),
        "val_auroc": auroc(split.split.labels, probs),
    }


def stop_check_interval(device: torch.device) -> int:
    """Steps between the workers' stop agreements: every step on the CPU (gloo, cheap); every
    STOP_CHECK_STEPS on CUDA, where reading the agreed flag waits for the GPU."""
    return 1 if device.type != "cuda" else STOP_CHECK_STEPS


def preempted(agreed: int, where: str) -> Preempted:
    return Preempted(
        f"stopped by {signal.Signals(agreed).name} {where}; {LAST_CHECKPOINT} saved: run the "
        "train stage again (`dvc repro`) to resume"
    )


class Trainer:
    """One training run: the loop (model, optimiser, step, data on the device) and its progress,
    checkpointed so that a stopped run resumes to the same bytes.

    With several workers (`world`) every worker runs a Trainer: all take part in each step and
    each save (the collectives), worker 0 validates, writes the checkpoints and logs.
    """

    def __init__(self, params: Params, world: World = SINGLE) -> None:
        self.params, self.tp, self.world = params, params.train, world
        seed_everything(self.tp.seed)
        self.device = resolve_device(self.tp.device)
        if self.device.type == "cuda" and world.distributed:
            self.device = torch.device("cuda", world.local_rank)
        self.bf16 = uses_bf16(self.tp.bf16, self.device)
        dataset = processed_data()
        self.train_split = Split.open(dataset.split_path("train"), params.loader)
        self.valid_split = Split.open(dataset.split_path("valid"), params.loader)
        self.mean, self.std = dataset.normalisation(self.device)
        # Keyed by file name, not path: a run on a staged copy (PCAM_TRAIN_DATA_DIR) of the same
        # files writes the same checkpoint bytes as one reading data/processed.
        data_md5 = dataset.md5s("train", "valid")
        # What the weights depend on besides params (cpu.numerics among them) and data: the
        # device. The library builds, the thread count, the CPU and where and when the run
        # happened are no part of the checkpoint's bytes: they go to the provenance record.
        self.provenance = {"data_md5": data_md5, "device": str(self.device)}
        self.order = split_order(self.train_split)
        if world.distributed:
            self.provenance["workers"] = world.size
            self.order += f"/workers:{world.size}"  # each worker's shard, its own generators
        self.fingerprint = fingerprint(params, data_md5, self.order)
        self.loop = Loop(
            self.tp, params.loader, self.train_split, self.mean, self.std, self.device, world=world
        )
        self.model, self.optimizer = self.loop.model, self.loop.optimizer
        self.valid_batches = DeviceBatches(self.valid_split, self.device, params.loader)
        self.progress = Progress()
        self.steps_per_epoch = self.loop.steps_per_epoch
        # Worker 0 logs; the others' norms are the same (all-reduced before clipping).
        self.step_log = StepLog(self.tp.log_every_steps if world.is_main else 0)
        self.step_rows: list[dict[str, float]] = []  # the run's per-step series so far

    def out_of_memory(
        self, free: int | None, total: int | None, detail: str, when: str
    ) -> Exception:
        return out_of_memory_error(
            batch_size=self.tp.batch_size,
            model=self.tp.model if self.tp.model != "timm" else f"timm {self.tp.timm.name}",
            compile_mode=self.tp.compile,
            free_bytes=free,
            total_bytes=total,
            device_name=torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else None,
            when=when,
            detail=detail,
        )

    def check_fit(self) -> None:
        """On CUDA, before the first epoch: one trial step at train.batch_size beside the data
        the loader placed on the device, so a batch too large for the GPU (a 5 GB MIG slice)
        stops the stage now, with the fix, and nothing written. The CPU run is left exactly as
        it was (no trial: its memory is the host's, and its bytes are in dvc.lock)."""
        if self.device.type != "cuda":
            return
        prove_fit(
            self.loop.trial_step,
            lambda: memory_found(self.device),
            lambda free, total, detail: self.out_of_memory(
                free, total, detail, "before the first epoch (nothing was written)"
            ),
        )

    @contextlib.contextmanager
    def out_of_memory_stops(self) -> Iterator[None]:
        """An out-of-memory during training (memory that grew after the trial step: another
        process on the GPU, fragmentation, validation) ends the stage with the same error;
        nothing is saved, so models/last.pt stays the last complete checkpoint."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            detail = str(exc)
            del exc
            free, total = memory_found(self.device)
            when = f"at epoch {self.progress.epoch + 1}; {LAST_CHECKPOINT} is kept as last saved"
            raise self.out_of_memory(free, total, detail, when) from None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.progress = Progress(**checkpoint["progress"])
        if self.world.distributed:  # each worker its own generators and running sums
            self.progress.sums = dict(checkpoint["worker_sums"][self.world.rank])
            set_rng_state(checkpoint["worker_rng"][self.world.rank])
        else:
            set_rng_state(checkpoint["rng"])
        if self.world.is_main and self.tp.log_every_steps:
            done = self.progress.epoch * self.steps_per_epoch + self.progress.batch
            self.step_rows = resumed_steps(LAST_CHECKPOINT, done)
        log.info(
            "resuming from %s at epoch %d, batch %d",
            LAST_CHECKPOINT,
            self.progress.epoch + 1,
            self.progress.batch,
        )

    def checkpoint(self) -> dict[str, Any]:
        """This worker's view of the checkpoint (`save` adds every worker's part)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": self.progress.as_dict(),
            "rng": rng_state(),
            "fingerprint": self.fingerprint,
            "data_order": self.order,
            "params": recorded_params(self.params),
            "provenance": self.provenance,
            "normalisation": {"mean": self.mean.tolist(), "std": self.std.tolist()},
        }

    def save(self, path: Path, complete: bool | None = None) -> None:
        """Write the checkpoint (worker 0), then its provenance record beside it (see
        `save_with_record`). Every worker calls it: with several, their running sums and random
        generators are gathered into it, so each resumes exactly where it stopped."""
        checkpoint = self.checkpoint()
        if complete is not None:
            checkpoint["progress"] = {**checkpoint["progress"], "complete": complete}
        if self.world.distributed:
            checkpoint["worker_sums"] = distributed.gather(self.progress.sums)
            checkpoint["worker_rng"] = distributed.gather(checkpoint["rng"])
        if self.world.is_main:
            if path == LAST_CHECKPOINT and self.tp.log_every_steps:
                save_steps(path, self.step_rows)
            save_with_record(path, checkpoint)
        if self.world.distributed:
            distributed.barrier()

    def agreed_stop(self, stop: StopFlag) -> int | None:
        """The stop signal, if any worker got one (a collective with several workers)."""
        if not self.world.distributed:
            return stop.signal
        return distributed.agree_on_stop(stop.signal, self.device)

    def train_epoch(self, stop: StopFlag) -> None:
        """Train to the end of the epoch; on a stop signal, save models/last.pt after the batch
        in flight and raise Preempted."""
        progress = self.progress
        sums = RunningSums(self.device, progress.sums)
        interval = stop_check_interval(self.device) if self.world.distributed else 1
        steps, agreed = 0, None

        def should_stop() -> bool:
            # Workers run the same steps, so all reach each agreement (a collective) together.
            nonlocal steps, agreed
            steps += 1
            if steps % interval:
                return False
            agreed = self.agreed_stop(stop)
            return agreed is not None

        plateau = Plateau(progress.plateau_scale, progress.plateau_bad_epochs)
        progress.batch = self.loop.run(
            progress.epoch,
            progress.batch,
            sums,
            plateau=plateau,
            should_stop=should_stop,
            step_log=self.step_log,
        )
        progress.sums = sums.read()
        self.step_rows += self.step_log.read()
        if agreed is not None:
            self.save(LAST_CHECKPOINT)
            raise preempted(agreed, f"at epoch {progress.epoch + 1}, batch {progress.batch}")

    def epoch_sums(self) -> dict[str, float]:
        """The epoch's sums over every worker, added in worker order (the same every run)."""
        sums = self.progress.sums
        if not self.world.distributed:
            return sums
        every = distributed.gather(sums)
        total = {key: sum(part[key] for part in every) for key in ("loss", "correct", "seen")}
        # Gradients are all-reduced before clipping: every worker saw the same norms.
        return {**total, "grad_norm": every[0]["grad_norm"], "steps": every[0]["steps"]}

    def validate(self) -> dict[str, float]:
        """Validation metrics, computed by worker 0 on the whole split and shared."""
        row = None
        if self.world.is_main:
            row = evaluate_split(self.model, self.valid_batches, self.mean, self.std, self.bf16)
        return distributed.broadcast(row) if self.world.distributed else row

    def end_epoch(self) -> dict[str, float]:
        """Validate, update the plateau schedule, keep a new best in models/best.pt, move to
        the next epoch and save models/last.pt; the epoch's row of metrics."""
        tp, progress, sums = self.tp, self.progress, self.epoch_sums()
        row = {
            "epoch": progress.epoch + 1,
            "train_loss": sums["loss"] / sums["seen"],
            "train_accuracy": sums["correct"] / sums["seen"],
            "grad_norm": sums["grad_norm"] / sums["steps"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.validate(),
        }
        plateau = Plateau(progress.plateau_scale, progress.plateau_bad_epochs).after_epoch(
            tp, row["val_loss"], [earlier["val_loss"] for earlier in progress.history]
        )
        progress.plateau_scale, progress.plateau_bad_epochs = plateau.scale, plateau.bad_epochs
        progress.history.append(row)
        value = row[tp.select_metric]
        if is_better(tp.select_metric, value, progress.best_value):
            progress.best_value, progress.best_epoch = value, progress.epoch + 1
            self.save(BEST_CHECKPOINT, complete=True)
        progress.epoch += 1
        progress.batch = 0
        progress.sums = Progress().sums
        progress.complete = progress.epoch >= tp.epochs
        self.save(LAST_CHECKPOINT)
        return row


def no_best_epoch(metric: str, history: list[dict[str, float]]) -> PipelineError:
    """Why no epoch was kept as best: `metric` was NaN in every one (is_better never takes NaN)."""
    diverged = [int(row["epoch"]) for row in history if not math.isfinite(row["train_loss"])]
    if diverged:
        cause = f"training diverged: train_loss was not finite from epoch {diverged[0]} on"
        fix = "lower train.lr, or clip the gradients (train.grad_clip, e.g. 1.0)"
    else:
        cause = "the model scored the validation split as NaN"
        fix = f"check {data_dir()} (`dvc repro validate preprocess`), then train again"
    return PipelineError(
        f"no epoch improved {metric}: it was NaN in all {len(history)} epochs ({cause}), so "
        f"nothing was saved as {BEST_CHECKPOINT}. Fix: {fix}"
    )


def fit(
    params: Params,
    stop: StopFlag,
    log_row: Callable[[dict[str, float]], None],
    world: World = SINGLE,
    log_steps: Callable[[list[dict[str, float]]], None] = lambda rows: None,
) -> Trainer:
    """Train to the last epoch, resuming from models/last.pt when it is an unfinished run of
    these params on this data; `log_row` gets every epoch's row and `log_steps` every epoch's
    per-step rows (train.log_every_steps), replayed ones first."""
    trainer = Trainer(params, world)
    trainer.check_fit()
    resumed = resume_point(LAST_CHECKPOINT, trainer.fingerprint, world)
    if resumed is not None:
        trainer.restore(resumed)
    log.info(
        "training %d epochs of %d batches on %s%s, starting at epoch %d batch %d",
        params.train.epochs,
        trainer.steps_per_epoch,
        trainer.device,
        f" x {world.size} workers" if world.distributed else "",
        trainer.progress.epoch + 1,
        trainer.progress.batch,
    )
    for row in trainer.progress.history:
        log_row(row)
    log_steps(trainer.step_rows)
    while trainer.progress.epoch < params.train.epochs:
        agreed = trainer.agreed_stop(stop)
        if agreed is not None:  # arrived between epochs: last.pt is up to date
            trainer.save(LAST_CHECKPOINT)
            raise preempted(agreed, f"before epoch {trainer.progress.epoch + 1}")
        with trainer.out_of_memory_stops():
            logged = len(trainer.step_rows)
            trainer.train_epoch(stop)
            row = trainer.end_epoch()
        log_steps(trainer.step_rows[logged:])
        log_row(row)
        log.info(
            "epoch %d: %s",
            row["epoch"],
            ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"),
        )
    if trainer.progress.best_epoch is None:
        raise no_best_epoch(params.train.select_metric, trainer.progress.history)
    return trainer
