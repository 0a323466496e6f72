"""Stopping cleanly when Slurm (or a user) asks: SIGUSR1 before the time limit, SIGTERM on cancel."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": the next run of the stage resumes


class Preempted(Exception):
    """A stop signal arrived and the resume checkpoint was saved."""


class StopFlag:
    """Set by SIGUSR1/SIGTERM; checked between batches so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning("received %s: saving a checkpoint at the next batch boundary",
                    signal.Signals(signum).name)
        self.signal = signum
