"""DVC experiments end to end: `dvc exp run -S`, `exp show`, `metrics diff`, `plots diff`, a queue.

Runs in a temporary git repository holding the project's tracked files, with params.yaml made
small (256/128/128 patches, one epoch) and committed after a first `dvc repro`: the baseline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml

from pcam_pipeline.train.checkpoint import load_checkpoint
from tests.integration.conftest import (
    VENV_BIN,
    copy_project,
    project_env,
    require_integration,
    run,
)
from tests.integration.experiment_fixtures import GIT, SMALL, update

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not (VENV_BIN / "dvc").exists() or shutil.which("git") is None:
        require_integration(f"needs git and dvc (looked for {VENV_BIN / 'dvc'}); run `make setup`")
    repo = copy_project(tmp_path_factory.mktemp("experiments") / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    update(raw, SMALL)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run([*GIT, "commit", "-q", "-m", "small baseline"], repo)
    yield repo
    run(["dvc", "queue", "stop", "--kill"], repo, check=False)  # no worker outlives the test


def metric(entry: dict[str, Any], *keys: str) -> Any:
    value = entry["data"]["metrics"]["reports/metrics.json"]["data"]
    for key in keys:
        value = value[key]
    return value


def lr(entry: dict[str, Any]) -> float:
    return entry["data"]["params"]["params.yaml"]["data"]["train"]["lr"]


def exp_show(repo: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The baseline row of `dvc exp show --json` and its experiments by name."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    baseline = next(row for row in rows if row["rev"] != "workspace")
    experiments = {
        exp["name"]: {**exp["revs"][0], "executor": exp.get("executor")}
        for exp in baseline.get("experiments") or []
    }
    return baseline, experiments


def test_exp_run_with_a_changed_param_gives_a_different_metric(small_repo):
    head = run(["git", "rev-parse", "HEAD"], small_repo).stdout.strip()
    result = run(["dvc", "exp", "run", "-S", "train.lr=0.0003", "-n", "lr-3e-4"], small_repo)
    log = result.stdout + result.stderr
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    for stage in ("fetch", "validate", "preprocess", "benchmark"):  # train.lr is no dep of these
        assert f"Running stage '{stage}'" not in log, stage

    baseline, experiments = exp_show(small_repo)
    experiment = experiments["lr-3e-4"]
    assert lr(baseline) == 0.002 and lr(experiment) == 0.0003
    assert metric(experiment, "test", "auroc") != metric(baseline, "test", "auroc")
    assert metric(experiment, "test", "nll") != metric(baseline, "test", "nll")
    assert metric(experiment, "threshold", "chosen_on") == "valid"

    # The workspace now holds the experiment: compare it with the committed baseline.
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], small_repo).stdout)
    auroc = diff["reports/metrics.json"]["test.auroc"]
    assert auroc["old"] == metric(baseline, "test", "auroc")
    assert auroc["new"] == metric(experiment, "test", "auroc")
    assert diff["dvclive/train/metrics.json"]["lr"]["new"] == 0.0003
    table = run(["dvc", "metrics", "diff"], small_repo).stdout
    assert "test.auroc" in table

    plots = json.loads(run(["dvc", "plots", "diff", "--json"], small_repo).stdout)["data"]
    for name in ("Loss", "AUROC and accuracy", "Learning rate", "ROC", "Calibration"):
        revisions = {rev for plot in plots[name] for rev in plot["revisions"]}
        assert revisions == {"workspace", "HEAD"}, name

    best = load_checkpoint(small_repo / "models" / "best.pt")
    assert best["params"]["train"]["lr"] == 0.0003
    record = json.loads((small_repo / "models" / "best.provenance.json").read_text())
    assert record["git_commit"] == head, "the provenance record names the code's commit"
    assert "git_commit" not in best["provenance"], "the checkpoint's bytes do not"


def test_queued_sweep_runs_every_value(small_repo):
    queued = run(["dvc", "exp", "run", "--queue", "-S", "train.lr=1e-3,3e-3"], small_repo)
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    # The worker it starts is a daemon that inherits stdout/stderr: give it a file, not a pipe,
    # or reading the command's output would wait for the whole queue.
    with open(small_repo.parent / "queue-start.log", "w") as log:
        started = subprocess.run(
            [str(VENV_BIN / "dvc"), "queue", "start", "-j", "1"],
            cwd=small_repo,
            env=project_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert started.returncode == 0, (small_repo.parent / "queue-start.log").read_text()
    deadline = time.monotonic() + 420
    while True:
        status = run(["dvc", "queue", "status"], small_repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the queue did not drain in 7 minutes:\n{status}")
        time.sleep(5)  # each status call is a python start: do not compete with the worker
    assert status.count("Success") == 2, status

    baseline, experiments = exp_show(small_repo)
    swept = {
        lr(exp): metric(exp, "test", "auroc")
        for exp in experiments.values()
        if exp["executor"] and exp["executor"]["name"] == "dvc-task"
    }
    assert set(swept) == {0.001, 0.003}
    assert len({*swept.values(), metric(baseline, "test", "auroc")}) == 3, swept


def test_a_timm_resnet_trains_as_an_experiment_and_predict_scores_with_it(small_repo):
    result = run(
        ["dvc", "exp", "run", "-S", "train.model=timm", "-S", "train.timm.name=resnet18",
         "-S", "train.batch_size=32", "-n", "resnet18"],
        small_repo,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    _, experiments = exp_show(small_repo)
    assert metric(experiments["resnet18"], "tta") == "none"
    best = load_checkpoint(small_repo / "models" / "best.pt")
    assert best["params"]["train"]["timm"]["name"] == "resnet18"
    # The handover: the checkpoint alone rebuilds the architecture.
    scores = small_repo.parent / "resnet18-scores.csv"
    run(
        ["pcam", "predict", "models/best.pt", "data/processed/test.h5", "--out", str(scores),
         "--device", "cpu", "--tta", "flips"],
        small_repo,
    )  # fmt: skip
    rows = scores.read_text().splitlines()
    with h5py.File(small_repo / "data" / "processed" / "test.h5", "r") as test:
        assert rows[0] == "patch,probability" and len(rows) == 1 + len(test["x"])
    assert all(0 < float(row.split(",")[1]) < 1 for row in rows[1:])
