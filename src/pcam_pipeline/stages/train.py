"""train: fit the model on data/processed, keep `last` and `best` checkpoints, log with dvclive.

Everything random is drawn from generators seeded by (train.seed, epoch, batch), so an epoch's
order and augmentations do not depend on what ran before; the global torch RNG (dropout) is
saved in every checkpoint. That makes a run stopped by SIGUSR1/SIGTERM (Slurm's warning before
the time limit) and resumed from models/last.pt end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from pcam_pipeline import distributed
from pcam_pipeline.data.hdf5 import processed_labels
from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.distributed import SINGLE, World
from pcam_pipeline.errors import DamagedCheckpoint, PipelineError, RefusedCheckpoint
from pcam_pipeline.inference import predict_split
from pcam_pipeline.metrics import auroc
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAIN_LIVE_DIR
from pcam_pipeline.preemption import EXIT_PREEMPTED, Preempted, StopFlag
from pcam_pipeline.repro import (
    load_checkpoint,
    md5_file,
    move_aside,
    package_versions,
    run_record,
    save_checkpoint,
    seed_everything,
    write_json,
)
from pcam_pipeline.runtime import (
    cpu_numerics_record,
    data_dir,
    processed_data,
    resolve_device,
    uses_bf16,
)
from pcam_pipeline.training import SUM_KEYS, Loop, RunningSums

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
STOP_CHECK_STEPS = 25  # CUDA workers agree on stopping every this many steps


def fingerprint(params: Params, data_md5: dict[str, str], order: str) -> str:
    """What a resumable checkpoint must match: training-relevant params, the data and the order.

    `order` is how the train split is visited (held in memory, or streamed in blocks of a given
    size): the two give different epoch orders, and which one is used depends on the memory
    available, so a run may only resume into the same one.
    """
    relevant = {"train": params.train.model_dump(), "data": data_md5, "order": order}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def split_order(split: Split) -> str:
    return "memory" if split.in_memory else f"stream:{split.params.block_patches}"


@dataclass
class Progress:
    """The loop's position and running sums: everything besides the tensors that a resume needs."""

    epoch: int = 0
    batch: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    plateau_scale: float = 1.0
    plateau_bad_epochs: int = 0
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def rng_state() -> dict[str, Any]:
    """Every global generator's full state, as tensors and plain data (loadable weights_only)."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state.get("numpy")
    if isinstance(numpy_state, dict):
        np.random.set_state(
            (
                "MT19937",
                numpy_state["key"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    if "python" in state:
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointSetAside(PipelineError):
    """models/last.pt could not be loaded; it was moved aside (kept), so the next run starts
    afresh instead of failing the same way forever."""


def set_aside(path: Path, error: DamagedCheckpoint | RefusedCheckpoint) -> CheckpointSetAside:
    """Move the unloadable checkpoint `path` aside, under a name that says why; the error to
    raise."""
    if isinstance(error, RefusedCheckpoint):
        moved, what = move_aside(path, "refused"), f"{path}: {error.reason}"
    else:
        moved, what = move_aside(path, "damaged"), f"{path} was damaged ({error.reason})"
    log.warning("%s; moved it to %s (kept: inspect or delete it)", what, moved)
    return CheckpointSetAside(
        f"{what}; moved to {moved}; run the stage again (`dvc repro`) to train afresh"
    )


def try_resume(path: Path, expected: str) -> dict[str, Any] | None:
    """The checkpoint in `path` if it is an unfinished run of these params on this data.

    One that cannot be loaded (cut short by an interrupted copy, or refused: it holds objects
    other than tensors and plain data) would fail every later run: it is moved aside and the
    stage fails saying so (CheckpointSetAside).
    """
    if not path.exists():
        return None
    try:
        checkpoint = load_checkpoint(path)
    except (DamagedCheckpoint, RefusedCheckpoint) as error:
        raise set_aside(path, error) from None
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        log.info(
            "%s has checkpoint format %s, this code writes %s: starting afresh",
            path,
            checkpoint.get("format"),
            CHECKPOINT_FORMAT,
        )
        return None
    if checkpoint.get("fingerprint") != expected:
        log.info("%s is from other params or data: starting afresh", path)
        return None
    if checkpoint["progress"]["complete"]:
        log.info("%s is a finished run: starting afresh", path)
        return None
    return checkpoint


def resume_point(path: Path, expected: str, world: World) -> dict[str, Any] | None:
    """`try_resume` for every worker: worker 0 judges the file (moving a damaged one aside) and
    the others follow its verdict, so none races it to the file and none is left waiting in a
    collective for a worker that failed."""
    if not world.distributed:
        return try_resume(path, expected)
    checkpoint, verdict = None, "afresh"
    if world.is_main:
        try:
            checkpoint = try_resume(path, expected)
        except CheckpointSetAside as error:
            verdict = str(error)
        else:
            verdict = "afresh" if checkpoint is None else "resume"
    verdict = distributed.broadcast(verdict)
    if verdict not in ("afresh", "resume"):
        raise CheckpointSetAside(verdict)
    if verdict == "afresh":
        return None
    return checkpoint if world.is_main else load_checkpoint(path)


PREPROCESS_FIX = (
    "check the source split, then re-run preprocess (`dvc repro preprocess`); "
    "reports/preprocess.json lists what it dropped"
)


def check_inputs(directory: Path, select_metric: str) -> None:
    """Fail before the first epoch on splits no training can use: an empty train or validation
    split, or, selecting by val_auroc, a validation split of one class (its AUROC is undefined,
    so every epoch would run and none could be kept as best)."""
    labels = {}
    dataset = ProcessedData(directory)
    for split in ("train", "valid"):
        path = dataset.split_path(split)
        if not path.is_file():
            raise PipelineError(f"{path}: missing. Fix: run `dvc repro preprocess` to write it")
        try:
            labels[split] = processed_labels(path)
        except (OSError, KeyError) as exc:
            raise PipelineError(
                f"{path}: cannot be read ({exc}). Fix: re-run preprocess (`dvc repro preprocess`)"
            ) from None
        if not len(labels[split]):
            role = "nothing to train on" if split == "train" else "no epoch can be scored"
            raise PipelineError(
                f"{path}: the {split} split is empty (0 patches): {role}. Fix: {PREPROCESS_FIX}"
            )
    classes = np.unique(labels["valid"]).tolist()
    if select_metric == "val_auroc" and len(classes) < 2:
        raise PipelineError(
            f"{dataset.split_path('valid')}: the validation split holds one class only (all "
            f"{len(labels['valid'])} labels are {classes[0]}): val_auroc (train.select_metric) "
            "is undefined in every epoch, so no epoch could be kept as best. Fix: set "
            f"train.select_metric: val_loss, or {PREPROCESS_FIX}"
        )


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
            self.tp,
            params.loader,
            self.train_split,
            self.mean,
            self.std,
            self.device,
            world=world,
        )
        self.model, self.optimizer = self.loop.model, self.loop.optimizer
        self.valid_batches = DeviceBatches(self.valid_split, self.device, params.loader)
        self.progress = Progress()
        self.steps_per_epoch = self.loop.steps_per_epoch

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.progress = Progress(**checkpoint["progress"])
        if self.world.distributed:  # each worker its own generators and running sums
            self.progress.sums = dict(checkpoint["worker_sums"][self.world.rank])
            set_rng_state(checkpoint["worker_rng"][self.world.rank])
        else:
            set_rng_state(checkpoint["rng"])
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
            "params": self.params.as_dict(),
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
            save_with_record(path, checkpoint)
        if self.world.distributed:
            distributed.barrier()

    def agreed_stop(self, stop: StopFlag) -> int | None:
        """The stop signal, if any worker got one (a collective with several workers)."""
        if not self.world.distributed:
            return stop.signal
        return distributed.agree_on_stop(stop.signal, self.device)

    def train_epoch(self, stop: StopFlag) -> None:
        progress = self.progress
        sums = RunningSums(self.device, progress.sums)
        agreed: list[int | None] = [None]
        interval = stop_check_interval(self.device) if self.world.distributed else 1
        steps = [0]

        def should_stop() -> bool:
            # Workers run the same steps, so all reach each agreement (a collective) together.
            steps[0] += 1
            if steps[0] % interval:
                return False
            agreed[0] = self.agreed_stop(stop)
            return agreed[0] is not None

        progress.batch = self.loop.run(
            progress.epoch,
            progress.batch,
            sums,
            lr_scale=progress.plateau_scale,
            should_stop=should_stop,
        )
        progress.sums = sums.read()
        if agreed[0] is not None:
            self.save(LAST_CHECKPOINT)
            raise Preempted(
                f"stopped by {signal.Signals(agreed[0]).name} at epoch "
                f"{progress.epoch + 1}, batch {progress.batch}; {LAST_CHECKPOINT} saved: "
                "run the train stage again (`dvc repro`) to resume"
            )

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
        tp, progress, sums = self.tp, self.progress, self.epoch_sums()
        row = {
            "epoch": progress.epoch + 1,
            "train_loss": sums["loss"] / sums["seen"],
            "train_accuracy": sums["correct"] / sums["seen"],
            "grad_norm": sums["grad_norm"] / sums["steps"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.validate(),
        }
        if tp.schedule == "plateau":
            if progress.history and row["val_loss"] >= min(r["val_loss"] for r in progress.history):
                progress.plateau_bad_epochs += 1
                if progress.plateau_bad_epochs >= 1:
                    progress.plateau_scale *= tp.gamma
                    progress.plateau_bad_epochs = 0
            else:
                progress.plateau_bad_epochs = 0
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


def stop_check_interval(device: torch.device) -> int:
    """Steps between the workers' stop agreements: every step on the CPU (gloo, cheap); every
    STOP_CHECK_STEPS on CUDA, where reading the agreed flag waits for the GPU."""
    return 1 if device.type != "cuda" else STOP_CHECK_STEPS


def save_with_record(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint, then `<name>.provenance.json` beside it: the commit, host, time and
    job that made it, with the checkpoint's md5. The record is not a DVC output, so where and
    when a run happened never changes the hashes in dvc.lock."""
    save_checkpoint(path, checkpoint)
    record = {
        "checkpoint": path.name,
        "md5": md5_file(path),
        **run_record(),
        "device": checkpoint["provenance"]["device"],
        "versions": package_versions(),
        "cpu": cpu_numerics_record(),
    }
    write_json(provenance_path(path), record)


def provenance_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.provenance.json")


def log_epoch(live: Any, row: dict[str, float]) -> None:
    for name, value in row.items():
        if name != "epoch":
            # No timestamp column: the .tsv files must be byte-identical between runs.
            live.log_metric(name, value, timestamp=False)
    live.next_step()


def fit(
    params: Params,
    stop: StopFlag,
    log_row: Callable[[dict[str, float]], None],
    world: World = SINGLE,
) -> Trainer:
    """Train to the last epoch, resuming from models/last.pt when it is an unfinished run of
    these params on this data; `log_row` gets every epoch's row (replayed ones first)."""
    check_inputs(data_dir(), params.train.select_metric)
    trainer = Trainer(params, world)
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
    while trainer.progress.epoch < params.train.epochs:
        agreed = trainer.agreed_stop(stop)
        if agreed is not None:  # arrived between epochs: last.pt is up to date
            trainer.save(LAST_CHECKPOINT)
            raise Preempted(
                f"stopped by {signal.Signals(agreed).name} before epoch "
                f"{trainer.progress.epoch + 1}; {LAST_CHECKPOINT} saved: run the train "
                "stage again (`dvc repro`) to resume"
            )
        trainer.train_epoch(stop)
        row = trainer.end_epoch()
        log_row(row)
        log.info(
            "epoch %d: %s",
            row["epoch"],
            ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"),
        )
    if trainer.progress.best_epoch is None:
        raise no_best_epoch(params.train.select_metric, trainer.progress.history)
    return trainer


class WorkersFailed(PipelineError):
    """A training worker failed; the others were stopped."""


def launch(params: Params, processes: int) -> None:
    """Run the train stage as `processes` workers (srun inside a Slurm allocation of several
    tasks, else local processes), with these exact params; raise as one process would."""
    if params.train.batch_size % processes:
        raise WorkersFailed(
            f"train.batch_size {params.train.batch_size} is the global batch and must divide "
            f"evenly over {processes} training processes: use a multiple of {processes} "
            "(or set train.devices)"
        )
    work = Path(".pcam-work")
    work.mkdir(exist_ok=True)
    params_file = work / f"train-params-{os.getpid()}.yaml"
    params_file.write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    argv = ["--params", str(params_file), *(["-v"] if log.isEnabledFor(logging.DEBUG) else [])]
    argv.append("train")
    try:
        if distributed.slurm_tasks() > 1:
            code = distributed.launch_srun(argv)
        else:
            code = distributed.launch_local(processes, argv)
    except distributed.DistributedError as error:
        raise WorkersFailed(str(error)) from None
    finally:
        params_file.unlink(missing_ok=True)
    if code == EXIT_PREEMPTED:
        raise Preempted(
            f"the training workers saved {LAST_CHECKPOINT} and stopped: run the train stage "
            "again (`dvc repro`) to resume"
        )
    if code != 0:
        raise WorkersFailed(f"a training worker exited with status {code} (its log is above)")


def main(params: Params) -> None:
    world = distributed.worker_world()
    if world is None:
        cuda = resolve_device(params.train.device).type == "cuda"
        processes = max(
            distributed.slurm_tasks(), distributed.requested_processes(params.train.devices, cuda)
        )
        if processes > 1:
            launch(params, processes)
            return
        world = SINGLE
    if world.distributed:
        cuda = resolve_device(params.train.device).type == "cuda"
        distributed.init(world, "cuda" if cuda else "cpu")
        if not world.is_main:  # one voice: worker 0 logs, the others only warn
            logging.getLogger("pcam_pipeline").setLevel(logging.WARNING)
    try:
        # Installed first: a SIGUSR1/SIGTERM while the data loads is honoured at the first
        # boundary instead of killing the process with the signal's default action. Live()
        # empties the log directory (and DVC removes it before the stage runs): a resumed run
        # replays the finished epochs' history, so the logs end identical to an unbroken run's.
        with StopFlag() as stop:
            if not world.is_main:
                fit(params, stop, lambda row: None, world)
                return
            from dvclive import Live

            with Live(str(TRAIN_LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
                fit(params, stop, lambda row: log_epoch(live, row), world)
    finally:
        distributed.shutdown()
