"""The DVC and git commands the tooling runs (experiments here, `pcam report`, the no-op
benchmark): one place that calls them and turns a failure into a PipelineError naming the
command, its exit code and the end of its stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError

ERROR_LINES = 20  # DVC's progress and tracebacks are long; its own message is at the end


def executable(name: str) -> str:
    """`name` from PATH, else beside this Python (a venv's dvc when .venv/bin is not on PATH)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else name)


def run(
    args: Sequence[str], cwd: Path | None = None, fix: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run `args` (dvc or git) in `cwd` with DVC's analytics off; the finished process. A failure
    raises a PipelineError with the command, its exit code, the last lines of its stderr (its
    stdout when stderr is empty) and `fix`, the next step for the user."""
    argv = [executable(args[0]), *args[1:]]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    where = f"{cwd}: " if cwd is not None else ""
    try:
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise PipelineError(
            f"{where}`{args[0]}` is not on PATH nor beside {sys.executable}: run `make setup` "
            "and use .venv/bin"
        ) from exc
    if result.returncode != 0:
        tail = "\n".join(
            (result.stderr.strip() or result.stdout.strip()).splitlines()[-ERROR_LINES:]
        )
        raise PipelineError(
            f"{where}`{' '.join(args)}` failed with exit code {result.returncode}:\n{tail}"
            + (f"\n{fix}" if fix else "")
        )
    return result


def command(args: Sequence[str], cwd: Path, fix: str = "") -> str:
    """Run `args` in `cwd`; its stdout (see `run`)."""
    return run(args, cwd, fix).stdout


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


def exp_run(repo: Path, name: str, params: Mapping[str, Any], targets: Sequence[str] = ()) -> None:
    """`dvc exp run -n NAME -S ...` of the whole pipeline, or of `targets` and what they need."""
    command(["dvc", "exp", "run", "-n", name, *set_args(params), *targets], repo)
