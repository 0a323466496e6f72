"""The DVC and git commands the experiment tooling runs: one place that calls them and turns a
failure into a PipelineError naming the command, the directory and DVC's own message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError


def command(args: Sequence[str], cwd: Path) -> str:
    """Run `args` in `cwd`; its stdout. A failure raises with the tail of its output (DVC's
    progress is long)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise PipelineError(f"{cwd}: `{' '.join(args)}` failed ({result.returncode}):\n{output}")
    return result.stdout


def set_args(params: Mapping[str, Any]) -> list[str]:
    """`-S key=value` for each param (values in YAML/JSON form: lists and strings survive)."""
    args: list[str] = []
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def experiment_names(repo: Path) -> set[str]:
    """Names of the experiments on the current commit."""
    return set(command(["dvc", "exp", "list", "--name-only"], repo).split())


def exp_run(repo: Path, name: str, params: Mapping[str, Any]) -> None:
    command(["dvc", "exp", "run", "-n", name, *set_args(params)], repo)


def clone_for_worker(submit: Path, work: Path, commit: str | None = None) -> Path:
    """A clone of `submit` at `commit` (default: its HEAD) in `work` sharing its DVC cache (what
    slurm/lib.sh's pcam_clone does for sweep jobs): an experiment runs there without taking
    `submit`'s lock, and `dvc exp push origin NAME` sends it back. A clone left at the same
    commit is reused."""
    submit = submit.resolve()
    head = commit or command(["git", "rev-parse", "HEAD"], submit).strip()
    if (work / ".git").exists() and command(["git", "rev-parse", "HEAD"], work).strip() == head:
        command(["git", "checkout", "--quiet", "--force", head], work)  # an interrupted run's edits
        return work
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    command(["git", "clone", "--quiet", "--no-checkout", str(submit), str(work)], submit)
    command(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", head], work)
    local_config = submit / ".dvc" / "config.local"
    if local_config.exists():
        shutil.copy2(local_config, work / ".dvc" / "config.local")
    cache = command(["dvc", "cache", "dir"], submit).strip().splitlines()[-1]
    command(["dvc", "cache", "dir", "--local", cache], work)
    command(["dvc", "checkout", "--allow-missing", "--quiet"], work)
    return work


def exp_push(work: Path, name: str) -> None:
    """Send experiment `name` from a worker's clone to the repository it was cloned from."""
    command(["dvc", "exp", "push", "--no-cache", "origin", name], work)
