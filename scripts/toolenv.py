"""What the Python commands in scripts/ share: their errors and the interpreter they run under.

Imported by scripts/remote.py and scripts/s3-server.py (their folder is on sys.path when they
run). Standard library only: it runs before the project's packages are known to import.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Set on the re-run under the project's interpreter, so that it never re-runs twice.
REEXEC_MARK = "PCAM_SCRIPTS_REEXEC"


def prog() -> str:
    """The command's name in its messages: `remote.py`."""
    return Path(sys.argv[0]).name


def die(message: str) -> NoReturn:
    sys.exit(f"{prog()}: error: {message}")


def importable(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in modules)
    except ImportError:  # a parent package is missing
        return False


def use_project_python(*modules: str) -> None:
    """Run this command again under the project's interpreter when it is not the one here:
    $PCAM_PYTHON, else, when `modules` cannot be imported here, the project's .venv (as
    scripts/common.sh's project_python picks for the shell scripts). Returns when this one is it."""
    if os.environ.get(REEXEC_MARK):
        return
    target = os.environ.get("PCAM_PYTHON") or ""
    if not target and not importable(*modules):
        venv = PROJECT_ROOT / ".venv" / "bin" / "python"
        target = str(venv) if venv.exists() else ""
    if not target:
        return
    resolved = shutil.which(target) or target
    if os.path.abspath(resolved) == os.path.abspath(sys.executable):
        return
    os.environ[REEXEC_MARK] = "1"
    try:
        os.execv(resolved, [resolved, sys.argv[0], *sys.argv[1:]])
    except OSError as e:
        die(
            f"cannot run the Python interpreter {target} ({e}): fix PCAM_PYTHON or run 'make setup'"
        )
