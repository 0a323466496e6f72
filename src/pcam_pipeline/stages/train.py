"""train: fit the model on data/processed, keep `last` and `best` checkpoints, log with dvclive.

The run itself (resuming, the epochs, validation, checkpoints) is train/run.py's; several
workers are train/distributed.py's. This stage checks its inputs, starts the workers or joins
them, and logs every epoch (and every train.log_every_steps steps) with dvclive. Stopped by
SIGUSR1/SIGTERM it saves models/last.pt and exits 75; the next `dvc repro` resumes from there to
the same bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.reader import processed_labels
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import Params
from pcam_pipeline.paths import TRAIN_LIVE_DIR
from pcam_pipeline.runtime import processed_data
from pcam_pipeline.train import distributed
from pcam_pipeline.train.distributed import SINGLE, World
from pcam_pipeline.train.preemption import StopFlag
from pcam_pipeline.train.run import fit

PREPROCESS_FIX = (
    "check the source split, then re-run preprocess (`dvc repro preprocess`); "
    "reports/preprocess.json lists what it dropped"
)


def check_inputs(dataset: ProcessedData, select_metric: str) -> None:
    """Fail before the first epoch on splits no training can use: an empty train or validation
    split, or, selecting by val_auroc, a validation split of one class (its AUROC is undefined,
    so every epoch would run and none could be kept as best)."""
    labels = {}
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


def log_epoch(live: Any, row: dict[str, float]) -> None:
    for name, value in row.items():
        if name != "epoch":
            # No timestamp column: the .tsv files must be byte-identical between runs.
            live.log_metric(name, value, timestamp=False)
    live.next_step()


def log_steps(live: Any, rows: list[dict[str, float]]) -> None:
    """The per-step series (plots/metrics/steps/grad_norm.tsv, lr.tsv) at their optimiser step.
    The epoch rows' step is the epoch, so it is put back after; the series are plots only, kept
    out of metrics.json (whose numbers are the epoch's)."""
    epoch = live.step
    for row in rows:
        live.step = int(row["step"])
        for name in ("grad_norm", "lr"):
            live.log_metric(f"steps/{name}", row[name], timestamp=False)
    live.step = epoch
    live.summary.pop("steps", None)


def run(params: Params, world: World) -> None:
    """This process's part of the run: the whole run, or one worker's."""
    check_inputs(processed_data(), params.train.select_metric)
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
            fit(
                params,
                stop,
                lambda row: log_epoch(live, row),
                world,
                lambda rows: log_steps(live, rows),
            )


def main(params: Params) -> None:
    world = distributed.worker_world()
    if world is None:  # started by DVC or a user: train here, or launch the workers
        processes = distributed.training_processes(params.train)
        if processes > 1:
            distributed.launch(params, processes)
            return
        world = SINGLE
    if world.distributed:
        distributed.init(world, "cuda" if distributed.uses_cuda(params.train) else "cpu")
        if not world.is_main:  # one voice: worker 0 logs, the others only warn
            logging.getLogger("pcam_pipeline").setLevel(logging.WARNING)
    try:
        run(params, world)
    finally:
        distributed.shutdown()
