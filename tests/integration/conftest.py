"""Shared integration fixtures: one real `dvc repro` of the embedded default per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
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


def run_command(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 1800,
) -> subprocess.CompletedProcess[str]:
    """Run a command like a user would; when it fails unexpectedly, fail with its output."""
    args = [str(c) for c in cmd]
    result = subprocess.run(
        args, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}) in {cwd or Path.cwd()}:\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def run(
    cmd: list[str], cwd: Path, check: bool = True, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """`run_command` in the environment `make setup` gives (`project_env`)."""
    return run_command(cmd, cwd=cwd, env=project_env(**extra_env), check=check)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def make_run_log(repo: Path) -> Path:
    """What `make run` printed in `pipeline_repo` (kept beside it, not in it)."""
    return repo.parent / "make-run.log"


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh `git clone` of the project after the README's `make run` in it: its own .venv
    from requirements.lock, then `dvc repro` of the embedded default.

    Shared by every integration test that needs pipeline outputs; tests must not modify it (copy
    it, or `git clone` it, first). The clone's .venv is removed afterwards (5.6 GB; the tests
    run DVC from the development environment, which has the same pins).
    """
    base = tmp_path_factory.mktemp("pipeline")
    origin = copy_project(base / "origin")
    repo = base / "repo"
    run(["git", "clone", "-q", str(origin), str(repo)], base)
    # The temporary origin is no remote a test should push to (they add their own).
    run(["git", "remote", "remove", "origin"], repo)
    run(
        ["dvc", "config", "--local", "core.site_cache_dir", str(repo / ".dvc" / "tmp" / "site")],
        repo,
    )
    result = run_command(["make", "run"], cwd=repo, env=project_env(), timeout=3600)
    make_run_log(repo).write_text(result.stdout + result.stderr)
    shutil.rmtree(repo / ".venv")
    yield repo


# The exported model's files, relative to a repository after `make run`: what the tests of its
# clients (WSInfer, `pcam slides`) need.
EXPORTED = {
    "torchscript": Path("models/export/wsinfer/torchscript_model.pt"),
    "config": Path("models/export/wsinfer/config.json"),
    "checkpoint": Path("models/best.pt"),
    "report": Path("reports/export.json"),
    "card": Path("models/export/model_card.json"),
}


@pytest.fixture(scope="module")
def exported(pipeline_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The exported model, its checkpoint, export report and card, copied out of the shared
    `pipeline_repo` so that nothing the tests run can touch it; all in one directory, which is
    also a WSInfer model directory (config.json, torchscript_model.pt)."""
    target = tmp_path_factory.mktemp("exported")
    copies = {}
    for key, relative in EXPORTED.items():
        copies[key] = target / relative.name
        shutil.copy2(pipeline_repo / relative, copies[key])
    return copies
