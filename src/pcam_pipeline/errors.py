"""The error the CLI reports as one clear message (anything else keeps its traceback)."""

from __future__ import annotations

from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": the next run of the stage resumes


class Preempted(Exception):
    """A stop signal arrived and the work in hand was saved (the CLI exits EXIT_PREEMPTED)."""


class PipelineError(RuntimeError):
    """Bad input or state the user can fix; the message names the file, the field and the fix."""


class CheckpointError(PipelineError):
    """A checkpoint that cannot be loaded. `reason` says why, for callers that add their own fix
    (train moves a damaged last.pt aside; evaluate and predict say how to get a good one)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class DamagedCheckpoint(CheckpointError):
    """Empty, cut short, or not a checkpoint at all (e.g. an interrupted copy)."""


class RefusedCheckpoint(CheckpointError):
    """It holds objects other than tensors and plain data: loading it could run code."""


class NoSpace(PipelineError):
    """The file system a stage writes to has not enough free space (found before writing, or
    when a write failed with ENOSPC)."""


def first_sentence(text: str, limit: int = 200) -> str:
    """What an error message says before its advice (torch's run to paragraphs)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")[:limit]
