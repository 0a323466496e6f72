"""An earlier version's `Trainer.train_epoch`, timed as a user ran it: the "before" column of
the GPU loop benchmark (`gpu_loop.time_baseline` runs this file).

Run by path, with the earlier checkout's `src/` first on PYTHONPATH and `-P` (no script
directory on sys.path), so that `pcam_pipeline` below is that version's, not this one's:

    PYTHONPATH=OLD/src python -P baseline_epoch.py OLD/params.yaml '[64, 256, 1024]' 200

`python -m` cannot do it: it would find this version's package first. So nothing else of this
version is imported, and `Trainer` and `Preempted` are looked up by module name where each
version keeps them (TRAINER_MODULES, PREEMPTED_MODULES): the file runs against this version and
any commit since 4a844e1 (issue 18: the run in `pcam_pipeline.trainer`), with a
`Trainer(params)` and `Trainer.train_epoch(stop)`. Commits before it (cdd6621, the "before" of
docs/performance.md's H200 figures) kept the run in the train stage, which no tool imports: time
those with this file as committed at 5f12ae8, run by path as above (`git show
5f12ae8:src/pcam_pipeline/bench/baseline_epoch.py`). Prints one line per batch size, then
`BASELINE-ALL <json rows>`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline.params import load_params

WARM_STEPS = 20
# Newest first: this version's module, then the one before the training core became a package.
TRAINER_MODULES = ("pcam_pipeline.train.run", "pcam_pipeline.trainer")
PREEMPTED_MODULES = ("pcam_pipeline.errors", "pcam_pipeline.preemption")


def version_attribute(modules: tuple[str, ...], name: str) -> Any:
    """`name` from the first of `modules` the checkout on PYTHONPATH has."""
    for module in modules:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        if hasattr(found, name):
            return getattr(found, name)
    raise SystemExit(
        f"error: the baseline checkout has no {name} in any of {', '.join(modules)}: it predates "
        "4a844e1; time it with this file as committed at 5f12ae8 (see its docstring)"
    )


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
    trainer = version_attribute(TRAINER_MODULES, "Trainer")(at_size)
    preempted = version_attribute(PREEMPTED_MODULES, "Preempted")
    with contextlib.suppress(preempted):  # the stop it asked for, after `steps` steps
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
