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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pcam_pipeline.data.loader import Split, augment, epoch_generator, normalise, to_device
from pcam_pipeline.inference import predict_split
from pcam_pipeline.metrics import auroc
from pcam_pipeline.models import build_model
from pcam_pipeline.params import Params, TrainParams
from pcam_pipeline.paths import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    PROCESSED_DIR,
    TRAIN_DATA_DIR_ENV,
    TRAIN_LIVE_DIR,
)
from pcam_pipeline.preemption import Preempted, StopFlag
from pcam_pipeline.repro import (
    load_checkpoint,
    provenance,
    read_json,
    save_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


def data_dir() -> Path:
    return Path(os.environ.get(TRAIN_DATA_DIR_ENV, PROCESSED_DIR))


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device is 'cuda' but no CUDA device is visible; "
            "use 'auto' or 'cpu', or run on a GPU node (`--gpus=1`)"
        )
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


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


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            nesterov=True,
        )
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that make both classes equally likely under WeightedRandomSampler."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return (1.0 / np.maximum(counts, 1))[labels]


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
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("loss", "correct", "seen", "grad_norm", "steps"), 0.0
        )
    )
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
    split: Split,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    bf16: bool,
) -> dict[str, float]:
    probs = predict_split(model, split, mean, std, device, 256, bf16)
    labels = split.labels.astype(np.float64)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    return {
        "val_loss": loss,
        "val_accuracy": float(((probs >= 0.5) == labels).mean()),
        "val_auroc": auroc(split.labels, probs),
    }


def load_stats(directory: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    stats = read_json(directory / "stats.json")
    return (torch.tensor(stats["mean"], device=device), torch.tensor(stats["std"], device=device))


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


def try_resume(path: Path, expected: str) -> dict[str, Any] | None:
    """The checkpoint in `path` if it is an unfinished run of these params on this data."""
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
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


class Trainer:
    """One training run: the model, its optimiser and the loop's progress."""

    def __init__(self, params: Params) -> None:
        self.params, self.tp = params, params.train
        seed_everything(self.tp.seed)
        self.device = resolve_device(self.tp.device)
        self.bf16 = self.tp.bf16 and self.device.type == "cuda"
        directory = data_dir()
        self.train_split = Split.open(directory / "train.h5", params.loader)
        self.valid_split = Split.open(directory / "valid.h5", params.loader)
        self.mean, self.std = load_stats(directory, self.device)
        files = [directory / "train.h5", directory / "valid.h5", directory / "stats.json"]
        found = provenance(files)
        # Keyed by file name, not path: a run on a staged copy (PCAM_TRAIN_DATA_DIR) of the same
        # files writes the same checkpoint bytes as one reading data/processed.
        data_md5 = {Path(k).name: v for k, v in found["data_md5"].items()}
        # Bit-identity holds for the same device and CPU thread count: record both.
        self.provenance = {
            **found,
            "data_md5": data_md5,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
        }
        self.order = split_order(self.train_split)
        self.fingerprint = fingerprint(params, data_md5, self.order)
        self.model = build_model(self.tp).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, self.tp)
        self.progress = Progress()
        self.steps_per_epoch = -(-self.train_split.length // self.tp.batch_size)
        self.weights = class_weights(self.train_split.labels) if self.tp.balanced_sampler else None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.progress = Progress(**checkpoint["progress"])
        set_rng_state(checkpoint["rng"])
        log.info(
            "resuming from %s at epoch %d, batch %d",
            LAST_CHECKPOINT,
            self.progress.epoch + 1,
            self.progress.batch,
        )

    def checkpoint(self) -> dict[str, Any]:
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

    def train_epoch(self, stop: StopFlag) -> None:
        tp, progress = self.tp, self.progress
        self.model.train()
        order = self.train_split.epoch_order(epoch_generator(tp.seed, progress.epoch), self.weights)
        loss_fn = nn.BCEWithLogitsLoss()
        batches = self.train_split.batches(order, tp.batch_size, progress.batch)
        bar = tqdm(
            batches,
            total=self.steps_per_epoch,
            initial=progress.batch,
            leave=False,
            desc=f"epoch {progress.epoch + 1}/{tp.epochs}",
            disable=None,
        )
        for x, y in bar:
            step = progress.epoch * self.steps_per_epoch + progress.batch
            for group in self.optimizer.param_groups:
                group["lr"] = (
                    tp.lr * lr_factor(tp, step, self.steps_per_epoch) * (progress.plateau_scale)
                )
            x, y = to_device(x, y, self.device)
            images = normalise(x, self.mean, self.std, channels_last=self.device.type == "cuda")
            generator = epoch_generator(tp.seed, progress.epoch, salt=1 + progress.batch)
            images = augment(images, generator, tp.augment.flip, tp.augment.rot90)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(images)
            loss = loss_fn(logits.float(), y.float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tp.grad_clip if tp.grad_clip > 0 else float("inf")
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.optimizer.step()

            n = len(y)
            sums = progress.sums
            sums["loss"] += loss.item() * n
            sums["correct"] += float(((logits.detach() > 0) == y.bool()).sum())
            sums["seen"] += n
            sums["grad_norm"] += float(grad_norm)
            sums["steps"] += 1
            progress.batch += 1
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}")
            log.debug(
                "epoch %d batch %d/%d loss %.4f",
                progress.epoch + 1,
                progress.batch,
                self.steps_per_epoch,
                loss.item(),
            )
            if stop.signal is not None:
                save_checkpoint(LAST_CHECKPOINT, self.checkpoint())
                raise Preempted(
                    f"stopped by {signal.Signals(stop.signal).name} at epoch "
                    f"{progress.epoch + 1}, batch {progress.batch}; {LAST_CHECKPOINT} saved: "
                    "run the train stage again (`dvc repro`) to resume"
                )

    def end_epoch(self) -> dict[str, float]:
        tp, progress, sums = self.tp, self.progress, self.progress.sums
        row = {
            "epoch": progress.epoch + 1,
            "train_loss": sums["loss"] / sums["seen"],
            "train_accuracy": sums["correct"] / sums["seen"],
            "grad_norm": sums["grad_norm"] / sums["steps"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **evaluate_split(
                self.model, self.valid_split, self.mean, self.std, self.device, self.bf16
            ),
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
            best = self.checkpoint()
            best["progress"] = {**best["progress"], "complete": True}
            save_checkpoint(BEST_CHECKPOINT, best)
        progress.epoch += 1
        progress.batch = 0
        progress.sums = Progress().sums
        progress.complete = progress.epoch >= tp.epochs
        save_checkpoint(LAST_CHECKPOINT, self.checkpoint())
        return row


def log_epoch(live: Any, row: dict[str, float]) -> None:
    for name, value in row.items():
        if name != "epoch":
            # No timestamp column: the .tsv files must be byte-identical between runs.
            live.log_metric(name, value, timestamp=False)
    live.next_step()


def main(params: Params) -> None:
    from dvclive import Live

    # Installed first: a SIGUSR1/SIGTERM while the data loads is honoured at the first boundary
    # instead of killing the process with the signal's default action.
    with StopFlag() as stop:
        trainer = Trainer(params)
        resumed = try_resume(LAST_CHECKPOINT, trainer.fingerprint)
        if resumed is not None:
            trainer.restore(resumed)
        log.info(
            "training %d epochs of %d batches on %s, starting at epoch %d batch %d",
            params.train.epochs,
            trainer.steps_per_epoch,
            trainer.device,
            trainer.progress.epoch + 1,
            trainer.progress.batch,
        )
        # Live() empties the log directory (and DVC removes it before the stage runs): a resumed
        # run replays the finished epochs' history, so the logs end identical to an unbroken run.
        with Live(str(TRAIN_LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            for row in trainer.progress.history:
                log_epoch(live, row)
            while trainer.progress.epoch < params.train.epochs:
                if stop.signal is not None:  # arrived between epochs: last.pt is up to date
                    save_checkpoint(LAST_CHECKPOINT, trainer.checkpoint())
                    raise Preempted(
                        f"stopped by {signal.Signals(stop.signal).name} before epoch "
                        f"{trainer.progress.epoch + 1}; {LAST_CHECKPOINT} saved: run the train "
                        "stage again (`dvc repro`) to resume"
                    )
                trainer.train_epoch(stop)
                row = trainer.end_epoch()
                log_epoch(live, row)
                log.info(
                    "epoch %d: %s",
                    row["epoch"],
                    ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"),
                )
    if trainer.progress.best_epoch is None:
        raise RuntimeError(f"no epoch improved {params.train.select_metric}; nothing saved as best")
