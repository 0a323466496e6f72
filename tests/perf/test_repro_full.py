"""perf/repro_full.py's arithmetic: a stage's own time from the timestamped `dvc repro` output,
and disk used with hard links counted once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pcam_pipeline.perf.children import PerfError
from pcam_pipeline.perf.repro_full import STAGE_DONE, data_stages_yaml, disk_used, split_times
from tests.conftest import REPO_ROOT

OUTPUT = [
    (0.5, "Running stage 'fetch':"),
    (1.0, f"> pcam fetch && echo {STAGE_DONE} fetch"),
    (4.0, f"{STAGE_DONE} fetch"),
    (6.0, "Running stage 'validate':"),
    (6.5, f"> pcam validate && echo {STAGE_DONE} validate"),
    (7.5, f"{STAGE_DONE} validate"),
    (8.0, f"> pcam preprocess && echo {STAGE_DONE} preprocess"),
    (10.0, f"{STAGE_DONE} preprocess"),
    (12.0, "Updating lock file 'dvc.lock'"),
]


def test_stage_times_and_bookkeeping_add_up_to_the_run():
    parts = split_times(13.0, OUTPUT)
    assert parts["dvc before fetch"] == 1.0 and parts["fetch itself"] == 3.0
    assert parts["dvc before validate"] == 2.5 and parts["validate itself"] == 1.0
    assert parts["dvc before preprocess"] == 0.5 and parts["preprocess itself"] == 2.0
    assert parts["dvc after preprocess"] == 3.0
    assert parts["stages"] == 6.0 and parts["dvc bookkeeping"] == 7.0


def test_a_stage_that_did_not_run_is_an_error():
    with pytest.raises(PerfError, match="did not run stage preprocess"):
        split_times(13.0, OUTPUT[:6])


def test_hard_links_are_counted_once(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 65536)
    os.link(tmp_path / "a" / "f", tmp_path / "b" / "f")
    one = disk_used(tmp_path / "a")
    assert one >= 65536
    assert disk_used(tmp_path / "a", tmp_path / "b") == one


def test_the_data_stages_are_the_projects_with_a_marker():
    stages = data_stages_yaml(REPO_ROOT / "dvc.yaml")["stages"]
    assert list(stages) == ["fetch", "validate", "preprocess"]
    assert stages["fetch"]["cmd"] == f"pcam fetch && echo {STAGE_DONE} fetch"
    assert "${fetch.checksums}" in stages["fetch"]["deps"]
