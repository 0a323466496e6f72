"""Shared integration fixtures: one real `dvc repro` of the embedded default per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent


def require_integration(reason: str) -> None:
    """Skip with `reason`, unless CI demands the integration tests (then fail instead)."""
    if os.environ.get("PCAM_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"integration test could not run and PCAM_REQUIRE_INTEGRATION=1: {reason}")
    pytest.skip(reason)


def project_env(**extra: str) -> dict[str, str]:
    """The environment a user has after `make setup`: the venv first on PATH, DVC quiet."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "pcam-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@pcam.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "pcam-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@pcam.invalid")
    env.update(extra)
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=project_env(**extra_env), text=True, capture_output=True
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}) in {cwd}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def copy_project(target: Path) -> Path:
    """The project's git-tracked files (what a clone has) in a new one-commit git repository."""
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    run(["git", "init", "-q", "-b", "main"], target)
    run(["git", "add", "-A"], target)
    run(["git", "commit", "-q", "-m", "pcam-pipeline under test"], target)
    run(
        ["dvc", "config", "--local", "core.site_cache_dir", str(target / ".dvc" / "tmp" / "site")],
        target,
    )
    return target


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clone-like copy of the project after one full `dvc repro` of the embedded default.

    Shared by every integration test that needs pipeline outputs; tests must not modify it (copy
    it, or `git clone` it, first).
    """
    repo = copy_project(tmp_path_factory.mktemp("pipeline") / "repo")
    result = run(["dvc", "repro"], repo)
    (repo / "repro.log").write_text(result.stdout + result.stderr)
    yield repo
