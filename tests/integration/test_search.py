"""`pcam seeds`, `pcam summarize` and `pcam search` on real DVC experiments of a small project.

One temporary repository (the project's tracked files, params made tiny, `dvc repro` committed)
for the module; each study runs real `dvc exp run`s in worker clones and pushes them back.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from pcam_pipeline.experiments.records import parse_exp_show
from pcam_pipeline.experiments.search import Place, open_study
from pcam_pipeline.experiments.study import load_study
from tests.integration.conftest import (
    VENV_BIN,
    copy_project,
    project_env,
    require_integration,
    run,
)
from tests.integration.experiment_fixtures import GIT, SMALL, update
from tests.search_proposals import proposals

pytestmark = pytest.mark.heavy

# The smallest experiments that still train and evaluate for real: one epoch, a small CNN.
TINY = {
    "fetch": {"sizes": {"train": 192, "valid": 64, "test": 64}},
    "train": {"epochs": 1, "batch_size": 32, "cnn": {"channels": [8, 16]}, "warmup_epochs": 0},
    # 64 test patches: one pair ranked the other way moves the AUROC by 1/1024
    "export": {"int8": {"max_auroc_drop": 0.05}},
    "export_bench": {"batch_sizes": [8], "rounds": 1},
}


def study_file(directory: Path, name: str, n_trials: int, seeds: int) -> Path:
    path = directory / f"{name}.yaml"
    study = {
        "name": name,
        "n_trials": n_trials,
        "seeds_per_trial": seeds,
        "objective": {"metric": "valid.auroc", "direction": "maximize"},
        "sampler": {"seed": 11},
        "params": {
            "train.lr": {"distribution": "log-uniform", "low": 3e-4, "high": 1e-2},
            "train.optimizer": {"distribution": "choice", "choices": ["adamw", "sgd"]},
        },
    }
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def search_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not (VENV_BIN / "dvc").exists():
        require_integration(f"needs dvc (looked for {VENV_BIN / 'dvc'}); run `make setup`")
    repo = copy_project(tmp_path_factory.mktemp("search") / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    update(raw, SMALL)
    update(raw, TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run([*GIT, "commit", "-q", "-m", "tiny baseline"], repo)
    yield repo


def pcam(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([str(VENV_BIN / "pcam"), *args], repo)


def experiments(repo: Path) -> dict[str, Any]:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    records = parse_exp_show(shown)
    names = [r.name for r in records]
    assert len(names) == len(set(names)), f"an experiment name twice: {sorted(names)}"
    return {r.name: r for r in records}


def test_seeds_and_their_summary(search_repo: Path):
    pcam(search_repo, "seeds", "2", "--first", "5")
    records = experiments(search_repo)
    assert {"seeds-s5", "seeds-s6"} <= set(records)
    assert "exists already" in pcam(search_repo, "seeds", "2", "--first", "5").stdout
    printed = pcam(search_repo, "summarize").stdout
    summary = json.loads((search_repo / "reports" / "summary.json").read_text())
    group = next(g for g in summary["groups"] if "seeds-s5" in g["experiments"])
    assert sorted(group["experiments"]) == ["seeds-s5", "seeds-s6"]
    values = [records[n].metrics["test.auroc"] for n in ("seeds-s5", "seeds-s6")]
    assert group["metrics"]["test.auroc"]["mean"] == pytest.approx(statistics.mean(values))
    assert group["metrics"]["test.auroc"]["std"] == pytest.approx(statistics.stdev(values))
    assert "±" in printed and "95% interval" in printed
    assert (search_repo / "reports" / "summary.md").read_text().startswith("| ")


def test_a_two_worker_study_of_dvc_experiments(search_repo: Path, tmp_path: Path):
    path = study_file(tmp_path, "duo", n_trials=4, seeds=2)
    pcam(search_repo, "search", str(path), "--workers", "2")
    spec = load_study(path, yaml.safe_load((search_repo / "params.yaml").read_text()))
    records = experiments(search_repo)
    report = json.loads((search_repo / "reports/search/duo/trials.json").read_text())
    assert sorted(t["number"] for t in report["trials"]) == [0, 1, 2, 3]
    for trial in report["trials"]:
        names = [f"duo-t{trial['number']}-s{seed}" for seed in (1, 2)]
        assert trial["experiments"] == names and set(names) <= set(records)
        for metric in ("valid.auroc", "test.auroc", "test.nll"):
            values = [records[n].metrics[metric] for n in names]
            assert trial["metrics"][metric]["mean"] == pytest.approx(statistics.mean(values))
            assert trial["metrics"][metric]["std"] == pytest.approx(statistics.stdev(values))
        assert trial["objective"] == pytest.approx(trial["metrics"]["valid.auroc"]["mean"])
        for name in names:  # what the trial proposed is what the experiment ran
            assert records[name].params["train.lr"] == pytest.approx(trial["params"]["train.lr"])
    best = max(report["trials"], key=lambda t: t["objective"])
    assert report["best_trial"] == best["number"]
    for plot in ("history", "parallel_coordinate", "importance"):
        assert (search_repo / f"reports/search/duo/{plot}.png").stat().st_size > 1000
    # The same sampler seed proposes the same params, whichever worker drew which trial.
    by_number = {t["number"]: t["params"] for t in report["trials"]}
    assert [by_number[n] for n in range(4)] == proposals(spec)

    pcam(search_repo, "search", "apply-best", str(path))
    applied = yaml.safe_load((search_repo / "params.yaml").read_text())
    assert applied["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    run(["git", "checkout", "--", "params.yaml"], search_repo)


def test_a_killed_worker_leaves_its_trial_failed_and_retried_once(
    search_repo: Path, tmp_path: Path
):
    path = study_file(tmp_path, "kill", n_trials=1, seeds=2)
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [str(VENV_BIN / "pcam"), "search", str(path), "--heartbeat", "1"],
            cwd=search_repo,
            env=project_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its dvc and training processes die with it
        )
        deadline = time.monotonic() + 600
        while "kill-t0-s2:" not in log.read_text():  # the first seed is pushed
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    rerun = pcam(search_repo, "search", str(path), "--heartbeat", "1", "--stale-after", "3")
    assert "its worker stopped beating; failed, enqueued again" in rerun.stdout
    assert "kill-t0-s1 was pushed by an earlier attempt; reused" in rerun.stdout
    spec = load_study(path, yaml.safe_load((search_repo / "params.yaml").read_text()))
    study = open_study(spec, Place(search_repo, "kill"))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    names = {n for n in experiments(search_repo) if n.startswith("kill-")}
    assert names == {"kill-t0-s1", "kill-t0-s2"}
    report = json.loads((search_repo / "reports/search/kill/trials.json").read_text())
    assert [t["number"] for t in report["trials"]] == [0]


def test_a_bad_study_file_is_named_before_any_trial(search_repo: Path, tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "n_trials": 2,
                "objective": {"metric": "test.auroc"},
                "params": {"train.lr": {"distribution": "uniform", "low": 0.001, "high": 0.01}},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.cli", "search", str(path)],
        cwd=search_repo, env=project_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "objective.metric" in result.stderr and "Traceback" not in result.stderr
