"""`pcam search study.yaml`: an Optuna study whose trials are DVC experiments.

Each trial runs the study's params under each of its seeds, one `dvc exp run` per seed in the
worker's own clone of the repository (several `dvc exp run` in one workspace would contend for
its lock), pushed back with `dvc exp push origin`: they show in `dvc exp show` of the repository
like any other experiment. The objective is the mean over the seeds of a validation metric.

The study lives in Optuna's journal file (append-only, with its open-file lock, which works on
NFS/GPFS where symlink locks and SQLite do not), beside the repository under .pcam-work/search/,
so any number of workers, on any node, share it. A worker that dies stops beating its trial's
heartbeat; the next worker to look marks that trial failed and enqueues it again with the same
params (Optuna's RetryHeartbeatStaleTrialCallback): the retry keeps the original trial's number
in its experiment names, so seeds the dead worker had already pushed are reused, not run twice.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments import dvc, job_clone, search_report
from pcam_pipeline.experiments.records import (
    SEED_PARAM,
    ExperimentRecord,
    is_test_metric,
    is_validation_metric,
    read_experiments,
)
from pcam_pipeline.experiments.search_report import ORIGIN_ATTR, origin_number
from pcam_pipeline.experiments.stats import spread
from pcam_pipeline.experiments.study import Choice, IntRange, LogUniform, Study, experiment_name
from pcam_pipeline.paths import PARAMS_FILE
from pcam_pipeline.repro import atomic_path

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # a RUNNING trial without a heartbeat this long has lost its worker
MAX_RETRY = 3
# A trial runs the pipeline up to evaluate, whose metrics are the objective: exporting and
# benchmarking every trial's model is work no trial is judged by (`dvc repro` after
# `pcam search apply-best` runs them for the one kept).
TRIAL_TARGETS = ("evaluate",)
SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class WorkerOptions:
    stale_after: float = STALE_AFTER_S
    heartbeat: float = HEARTBEAT_S
    fixed: dict[str, Any] = field(default_factory=dict)  # -S: set in every experiment
    commit: str | None = None  # the commit the clones run (Slurm: PCAM_COMMIT); else HEAD


@dataclass(frozen=True)
class Place:
    """Where a study's files are: the repository, its journal, its workers' clones, reports."""

    repo: Path
    study: str

    @property
    def work(self) -> Path:
        return job_clone.work_root(self.repo) / "search" / self.study

    @property
    def journal(self) -> Path:
        return self.work / "journal.log"

    @property
    def reports(self) -> Path:
        return self.repo / "reports" / "search" / self.study

    def clone(self, worker: str) -> Path:
        return self.work / f"worker-{worker}"


def open_study(spec: Study, place: Place) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    place.journal.parent.mkdir(parents=True, exist_ok=True)
    path = str(place.journal)
    storage = optuna.storages.JournalStorage(
        JournalFileBackend(path, lock_obj=JournalFileOpenLock(path))
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.objective.direction,
        sampler=sampler_for(spec, 0),
        load_if_exists=True,
    )


def sampler_for(spec: Study, trial_number: int) -> Any:
    """TPE seeded by the study's seed and the trial's number: which worker draws trial N does
    not change its proposal (the random start-up trials are the same on every rerun; later ones
    also depend on the trials finished before them)."""
    import optuna

    return optuna.samplers.TPESampler(seed=spec.sampler.seed * 100_003 + trial_number)


def suggest(trial: Any, spec: Study) -> dict[str, Any]:
    """The trial's value of each searched param (fixed already for a retried trial)."""
    values: dict[str, Any] = {}
    for key, dist in spec.params.items():
        if isinstance(dist, Choice):
            # Optuna's choices are scalars; a list (cnn.channels) travels as its JSON text
            encoded = [c if isinstance(c, SCALARS) else json.dumps(c) for c in dist.choices]
            picked = trial.suggest_categorical(key, encoded)
            values[key] = dist.choices[encoded.index(picked)]
        elif isinstance(dist, IntRange):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step)
        else:
            values[key] = trial.suggest_float(
                key, dist.low, dist.high, log=isinstance(dist, LogUniform)
            )
    return values


def propose(spec: Study, study: Any) -> tuple[Any, dict[str, Any]]:
    """Ask `study` for its next trial and draw its params with that trial's sampler."""
    trial = study.ask()
    if ORIGIN_ATTR not in trial.user_attrs:
        trial.set_user_attr(ORIGIN_ATTR, trial.number)
    study.sampler = sampler_for(spec, trial.number)  # what suggest() draws with
    return trial, suggest(trial, spec)


def reported_metrics(record: ExperimentRecord) -> dict[str, float]:
    return {k: v for k, v in record.metrics.items() if is_validation_metric(k) or is_test_metric(k)}


def run_trial(
    spec: Study, clone: Path, trial: Any, values: dict[str, Any], fixed: dict[str, Any]
) -> float:
    """Each seed's experiment (run here, or reused when pushed by an earlier attempt); the mean
    of the objective metric over them. Per-seed metrics are kept in the trial's user attrs."""
    number = origin_number(trial)
    pushed = set(dvc.command(["dvc", "exp", "list", "--name-only", "origin"], clone).split())
    names = [experiment_name(spec.name, number, seed) for seed in spec.seeds]
    for seed, name in zip(spec.seeds, names, strict=True):
        if name in pushed:
            print(f"trial {number}: {name} was pushed by an earlier attempt; reused", flush=True)
            dvc.command(["dvc", "exp", "pull", "--no-cache", "origin", name], clone)
            continue
        print(f"trial {number}: {name}: {values}", flush=True)
        dvc.command(["git", "checkout", "--", "params.yaml"], clone)
        dvc.exp_run(clone, name, {**fixed, **values, SEED_PARAM: seed}, TRIAL_TARGETS)
        job_clone.push(clone, name)
    records = {r.name: r for r in read_experiments(clone)}
    missing = [n for n in names if n not in records]
    if missing:
        raise PipelineError(f"{clone}: experiments {missing} not in `dvc exp show` after running")
    metric = spec.objective.metric
    per_seed = {name: reported_metrics(records[name]) for name in names}
    for name, metrics in per_seed.items():
        if metric not in metrics:
            raise PipelineError(
                f"experiment {name} has no metric '{metric}' (the study's objective.metric); "
                f"it has: {', '.join(sorted(metrics))}"
            )
    trial.set_user_attr("experiments", names)
    trial.set_user_attr("metrics", per_seed)
    return spread([per_seed[n][metric] for n in names]).mean


@contextmanager
def heartbeat(trial: Any, interval: float) -> Iterator[None]:
    """Beat `trial`'s heartbeat (a user attr in the journal) until the block ends."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            trial.set_user_attr("heartbeat", time.time())

    trial.set_user_attr("heartbeat", time.time())
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def last_sign_of_life(trial: Any) -> float:
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(started, float(trial.user_attrs.get("heartbeat", 0.0)))


def fail_stale_trials(study: Any, stale_after: float, now: float) -> list[int]:
    """RUNNING trials whose worker has not beaten for `stale_after` s: marked failed and
    enqueued again with the same params; their numbers."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - last_sign_of_life(trial) > stale_after:
            frozen = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            retry(study, frozen)
            failed.append(trial.number)
    return failed


def next_trial(
    spec: Study, study: Any, place: Place, stale_after: float
) -> tuple[Any, dict[str, Any]] | str:
    """Under the study's ask lock: the next trial and its params, or "wait" (trials of other
    workers are running) or "done"."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.trial import TrialState

    lock = JournalFileOpenLock(f"{place.journal}.ask")  # one asker at a time: no extra trial
    lock.acquire()
    try:
        for number in fail_stale_trials(study, stale_after, time.time()):
            print(f"trial {number}: its worker stopped beating; failed, enqueued again", flush=True)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        waiting = states.count(TrialState.WAITING)
        running = states.count(TrialState.RUNNING)
        if not waiting and states.count(TrialState.COMPLETE) + running >= spec.n_trials:
            return "wait" if running else "done"
        return propose(spec, study)
    finally:
        lock.release()


def work(spec: Study, place: Place, worker: str, options: WorkerOptions) -> None:
    """One worker: trials until the study has n_trials complete ones."""
    from optuna.trial import TrialState

    study = open_study(spec, place)
    clone = job_clone.make_or_reuse(place.repo, place.clone(worker), options.commit).path
    while True:
        step = next_trial(spec, study, place, options.stale_after)
        if step == "done":
            break
        if step == "wait":
            time.sleep(options.heartbeat)
            continue
        trial, values = step
        with heartbeat(trial, options.heartbeat):
            try:
                value = run_trial(spec, clone, trial, values, options.fixed)
            except PipelineError:
                study.tell(trial, state=TrialState.FAIL)
                raise
        study.tell(trial, value)
        print(f"trial {origin_number(trial)}: {spec.objective.metric} = {value:.4f}", flush=True)
    shutil.rmtree(clone)  # its experiments are pushed; a failed worker's clone is kept


def worker_command(study_file: Path, worker: str, options: WorkerOptions) -> list[str]:
    fixed = [f"--set={key}={json.dumps(value)}" for key, value in options.fixed.items()]
    return [
        sys.executable, "-m", "pcam_pipeline.cli", "search", str(study_file), "--worker", worker,
        "--stale-after", str(options.stale_after), "--heartbeat", str(options.heartbeat), *fixed,
    ]  # fmt: skip


def default_worker_id() -> str:
    array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if all(array):
        return f"{array[0]}_{array[1]}"
    return f"{socket.gethostname()}-{os.getpid()}"


def main(
    spec: Study,
    study_file: Path,
    repo: Path = Path("."),
    workers: int = 1,
    worker: str | None = None,
    options: WorkerOptions = WorkerOptions(),
) -> None:
    """`workers` > 1: that many worker processes, then the report; else work here. With
    `worker` (a Slurm array task, a --workers child): work only, no report."""
    place = Place(repo.resolve(), spec.name)
    if workers > 1 and worker is None:
        processes = [
            subprocess.Popen(worker_command(study_file, f"{os.getpid()}-{i}", options), cwd=repo)
            for i in range(workers)
        ]
        codes = [p.wait() for p in processes]
        if any(codes):
            raise PipelineError(
                f"{sum(1 for c in codes if c)} of {workers} workers failed (see above); "
                f"rerun `pcam search {study_file}` to continue the study"
            )
    else:
        work(spec, place, worker or default_worker_id(), options)
    if worker is None:
        report(spec, repo)


def report(spec: Study, repo: Path = Path(".")) -> None:
    """reports/search/<study>/ from the study's journal as it stands."""
    place = Place(repo.resolve(), spec.name)
    if not place.journal.exists():
        raise PipelineError(f"{place.journal}: no such study yet; run `pcam search` first")
    search_report.main(spec, open_study(spec, place), place.reports)


def apply_best(spec: Study, repo: Path = Path(".")) -> str:
    """The champion's params.yaml (from its first seed's experiment commit) into the workspace,
    ready to commit; `dvc repro` then restores its outputs from the run-cache. (Not `dvc exp
    apply`: it also checks out data/raw, which the default pipeline never downloads.)"""
    name = search_report.best_experiment(Place(repo.resolve(), spec.name).reports)
    records = {r.name: r for r in read_experiments(repo)}
    if name not in records:
        raise PipelineError(
            f"{repo.resolve()}: the champion's experiment {name} is not in `dvc exp show`: "
            f"`dvc exp pull origin {name}` it, or rerun `pcam search` here"
        )
    text = dvc.command(["git", "show", f"{records[name].rev}:{PARAMS_FILE}"], repo)
    with atomic_path(repo / PARAMS_FILE) as tmp:
        tmp.write_text(text)
    print(f"{PARAMS_FILE}: the params of {name}; `git diff {PARAMS_FILE}` shows them; commit them")
    return name
