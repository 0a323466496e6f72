"""The data-change workflow's steps (.github/workflows/data.yml): `make data-check` runs fetch,
validate and preprocess again after a data param changed, and `make data-report` sets the new
dataset beside the base's, field by field; in a copy of the project, on the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import copy_project, project_env, run_command

pytestmark = pytest.mark.heavy


def test_data_check_and_report_show_what_a_data_change_did(tmp_path: Path):
    repo = copy_project(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["fetch"]["sizes"]["train"] = 1024
    params["train"]["lr"] = 0.5  # not a data param: left out of the data report
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # `-o`: the development venv stands in for the copy's own (make setup is not under test)
    check = run_command(
        ["make", "-s", "-o", ".venv/.installed", "data-check"], cwd=repo, env=project_env()
    )
    assert check.returncode == 0, check.stdout + check.stderr
    report_run = run_command(
        ["make", "-s", "data-report", "PCAM_REPORT_BASE=HEAD"], cwd=repo, env=project_env()
    )
    assert report_run.returncode == 0, report_run.stdout + report_run.stderr
    report = (repo / "reports" / "compare" / "data.md").read_text()
    assert "Pinned data files changed: none." in report
    assert "| fetch.sizes.train | 2048 | 1024 |" in report and "train.lr" not in report
    assert "passed: 0 errors" in report
    assert "| train.n | 2048 | **1024** |" in report and "| valid.n | 512 | 512 |" in report
    assert "| train.n_in | 2048 | **1024** |" in report
    assert "## Channel statistics of the processed train split" in report


def test_data_report_names_a_revision_that_is_not_there(tmp_path: Path):
    repo = copy_project(tmp_path / "repo")
    done = run_command(
        ["pcam", "data-report", "no-such-branch"], cwd=repo, env=project_env(), check=False
    )
    assert done.returncode == 1
    assert "no-such-branch: not a revision here; fetch it (git fetch)" in done.stderr
