"""An earlier version's `Trainer.train_epoch`, timed as a user ran it: the "before" column of
the GPU check (`gpucheck.time_baseline` runs this file).

Run by path, with the earlier checkout's `src/` first on PYTHONPATH and `-P` (no script
directory on sys.path), so that `pcam_pipeline` below is that version's, not this one's:

    PYTHONPATH=OLD/src python -P baseline_epoch.py OLD/params.yaml '[64, 256, 1024]' 200

`python -m` cannot do it: it would find this version's package first. So nothing else of this
version is imported; the file runs against any version with a `Trainer(params)` (in `trainer`,
or in `stages.train` before it moved) and `Trainer.train_epoch(stop)`. Prints one line per
batch size, then `BASELINE-ALL <json rows>`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline.params import load_params
from pcam_pipeline.preemption import Preempted

try:
    from pcam_pipeline.trainer import Trainer
except ImportError:  # a version from before the run moved below the stage
    from pcam_pipeline.stages.train import Trainer  # type: ignore[no-redef]

WARM_STEPS = 20


def synchronize() -> None:
    """Wait for the GPU (a run without one, as in the tests, has nothing to wait for)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StopAfter:
    """The stop flag `train_epoch` asks once per step: it starts the clock after `warm` steps,
    stops it `steps` steps later and then asks the epoch to stop (SIGUSR1, as Slurm would)."""

    def __init__(self, warm: int, steps: int) -> None:
        self.warm, self.steps, self.calls = warm, steps, 0
        self.started = self.ended = 0.0

    @property
    def signal(self) -> int | None:
        if self.ended:
            return signal.SIGUSR1
        self.calls += 1
        if self.calls == self.warm:
            synchronize()
            self.started = time.perf_counter()
        if self.calls == self.warm + self.steps:
            synchronize()
            self.ended = time.perf_counter()
            return signal.SIGUSR1
        return None


def time_batch_size(params: Any, batch_size: int, steps: int) -> dict[str, float]:
    """img/s of `steps` steps of that version's epoch at `batch_size`, bf16 on CUDA."""
    update = {"batch_size": batch_size, "device": "cuda", "bf16": True}
    at_size = params.model_copy(update={"train": params.train.model_copy(update=update)})
    stop = StopAfter(WARM_STEPS, steps)
    trainer = Trainer(at_size)
    with contextlib.suppress(Preempted):  # the stop it asked for, after `steps` steps
        trainer.train_epoch(stop)
    return {"batch_size": batch_size, "img_s": steps * batch_size / (stop.ended - stop.started)}


def main(argv: list[str]) -> int:
    params_file, batch_sizes, steps = argv
    params = load_params(Path(params_file))
    rows = []
    for batch_size in json.loads(batch_sizes):
        rows.append(time_batch_size(params, batch_size, int(steps)))
        print("BASELINE " + json.dumps(rows[-1]), flush=True)
    print("BASELINE-ALL " + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
