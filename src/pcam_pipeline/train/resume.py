"""What a training checkpoint holds and when a run may resume from one.

A checkpoint is plain data and tensors (loadable with `weights_only`): the model and optimiser
state, the loop's `Progress`, every global random generator's state, and the fingerprint of what
the weights depend on. A run resumes from models/last.pt only when the fingerprint matches and
the run it holds is unfinished; one that cannot be loaded is moved aside, never deleted. Where
and when a checkpoint was made goes to a provenance record beside it, which no DVC hash sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcam_pipeline.errors import DamagedCheckpoint, PipelineError, RefusedCheckpoint
from pcam_pipeline.params import Params, TrainParams
from pcam_pipeline.repro import md5_file, package_versions, read_json, run_record, write_json
from pcam_pipeline.runtime import cpu_numerics_record, gpu_record
from pcam_pipeline.train import distributed
from pcam_pipeline.train.checkpoint import load_checkpoint, move_aside, save_checkpoint
from pcam_pipeline.train.distributed import World
from pcam_pipeline.train.loop import SUM_KEYS

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1

# The params sections the weights depend on: the train stage's params in dvc.yaml (a test holds
# the two together). A checkpoint records these and no others, so editing another stage's
# params (evaluate's, the benchmark's) never changes a checkpoint's bytes.
TRAINED_SECTIONS = ("cpu", "train", "loader")


# train params that change what is logged, never the weights: no part of a checkpoint or of its
# fingerprint (a run resumes across a change of them, and checkpoints kept their bytes).
LOGGING_ONLY = ("log_every_steps",)


def used_train_params(train: TrainParams) -> dict[str, Any]:
    """train's params as a run uses them: `train.timm` only when the model is a timm one, so
    the CNN's and the MLP's checkpoints stayed byte-identical when the section was added."""
    used = train.model_dump(exclude=set(LOGGING_ONLY))
    if train.model != "timm":
        del used["timm"]
    return used


def recorded_params(params: Params) -> dict[str, Any]:
    """The params sections a checkpoint records: what its weights depend on, and what `pcam
    predict` rebuilds the model from."""
    everything = params.as_dict()
    recorded = {section: everything[section] for section in TRAINED_SECTIONS}
    return {**recorded, "train": used_train_params(params.train)}


def fingerprint(params: Params, data_md5: dict[str, str], order: str) -> str:
    """What a resumable checkpoint must match: the train and cpu params, the data and the order.

    `order` is how the train split is visited (held in memory, or streamed in blocks of a given
    size): the two give different epoch orders, and which one is used depends on the memory
    available, so a run may only resume into the same one. The CPU numerics are in it because a
    run resumed with other kernels would end in weights neither setting gives.
    """
    relevant = {
        "train": used_train_params(params.train),
        "cpu": params.cpu.model_dump(),
        "data": data_md5,
        "order": order,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@dataclass
class Progress:
    """The loop's position and running sums: everything besides the tensors that a resume needs.

    Its fields, in this order, are the checkpoint's `progress`: a new one changes every
    checkpoint's bytes."""

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
        # torch.__version__ names the build (2.13.0+cu130, 2.13.0+cpu); the package metadata
        # of PyPI's build says only 2.13.0.
        "versions": {**package_versions(), "torch": torch.__version__},
        "cpu": cpu_numerics_record(),
        # The GPU's names and whether it is a MIG slice, and which profile (1g.5gb): a slice
        # and a whole A100 differ in SMs, so their runs may differ (docs/reproducibility.md).
        # None on the CPU.
        "gpu": gpu_record(),
    }
    write_json(provenance_path(path), record)


def provenance_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.provenance.json")


def steps_path(checkpoint: Path) -> Path:
    """Where the per-step series of a run lives beside its checkpoint (not in it: the series is
    logging, and the checkpoints kept their bytes when it was added)."""
    return checkpoint.with_name(f"{checkpoint.stem}.steps.json")


def save_steps(checkpoint: Path, rows: list[dict[str, float]]) -> None:
    """The series so far, written before the checkpoint: it is never behind it."""
    write_json(steps_path(checkpoint), rows)


def resumed_steps(checkpoint: Path, step: int) -> list[dict[str, float]]:
    """The per-step series of the run `checkpoint` stopped at global `step`: the rows up to
    that step (a stop after the series was written and before the checkpoint leaves later
    ones). Missing or unreadable, the series restarts here, with a warning."""
    path = steps_path(checkpoint)
    try:
        rows = read_json(path)
        kept = [row for row in rows if row["step"] <= step]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s: %s; the per-step series starts again at step %d", path, exc, step + 1)
        return []
    return kept
