"""The foundation, end to end: `dvc repro` of the embedded default in a fresh git repository."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.integration.conftest import run

pytestmark = pytest.mark.heavy
STAGES = ["fetch", "validate", "preprocess", "train", "evaluate", "benchmark"]
# Checkpoints embed the git commit (provenance), so they differ between repositories by design.
DATA_STAGES = ["fetch", "validate", "preprocess"]


def lock_outs(lock_file: Path) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load(lock_file.read_text())["stages"]
    return {
        name: {o["path"]: o["md5"] for o in stage.get("outs", [])} for name, stage in stages.items()
    }


def test_repro_runs_all_six_stages_then_nothing(pipeline_repo: Path):
    log = (pipeline_repo / "repro.log").read_text()
    for stage in STAGES:
        # A stage whose deps and git-tracked outputs already match the committed dvc.lock is
        # skipped by DVC; every other stage must have run.
        assert f"Running stage '{stage}'" in log or f"Stage '{stage}' didn't change" in log
    for stage in ["fetch", "preprocess", "train", "evaluate"]:
        assert f"Running stage '{stage}'" in log, "stages with cached outputs ran"
    again = run(["dvc", "repro"], pipeline_repo)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = run(["dvc", "status", "dvc.yaml"], pipeline_repo)
    assert "Data and pipelines are up to date" in status.stdout


def test_outputs_match_the_committed_lock(pipeline_repo: Path):
    """Same code and params, same bytes: the committed dvc.lock is what `dvc repro` produces."""
    fresh, committed = lock_outs(pipeline_repo / "dvc.lock"), lock_outs(REPO_ROOT / "dvc.lock")
    for stage in DATA_STAGES:
        assert fresh[stage] == committed[stage], stage
    metrics = json.loads((pipeline_repo / "reports/metrics.json").read_text())
    assert metrics == json.loads((REPO_ROOT / "reports/metrics.json").read_text())


def test_metrics_beat_the_baseline(pipeline_repo: Path):
    metrics = json.loads((pipeline_repo / "reports/metrics.json").read_text())
    assert metrics["test"]["auroc"] > 0.9
    assert metrics["test"]["accuracy"] > metrics["baseline"]["accuracy"] + 0.3
    assert metrics["threshold"]["chosen_on"] == "valid"
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], pipeline_repo).stdout)
    assert shown, "dvc metrics show reads the declared metrics"


def test_bad_params_fail_the_stage_with_the_key(pipeline_repo: Path, tmp_path: Path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pipeline_repo), str(clone)], tmp_path)
    params = (clone / "params.yaml").read_text().replace("chunk_patches: 64", "chunk_patches: -1")
    (clone / "params.yaml").write_text(params)
    result = run(["dvc", "repro", "preprocess"], clone, check=False)
    assert result.returncode != 0
    assert (
        "preprocess.chunk_patches: Input should be greater than 0" in result.stderr + result.stdout
    )
