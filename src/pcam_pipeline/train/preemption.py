"""Stopping cleanly when Slurm or a user asks: SIGUSR1 before the time limit, SIGTERM on cancel."""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; checked between batches so a checkpoint is never half a step.

    Use as a context manager: the previous handlers come back on exit, so training called in a
    longer-lived process (a test runner, a notebook) does not leave it deaf to SIGTERM.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning(
            "received %s: saving a checkpoint at the next batch boundary",
            signal.Signals(signum).name,
        )
        self.signal = signum
