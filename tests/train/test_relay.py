"""pcam_pipeline.train.relay on real processes: which ones are training, which one gets the stop
signal, and the exit status it passes on
(the whole chain under slurm/lib.sh is in tests/slurm/test_scripts.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pcam_pipeline.train import relay

VENV = "/home/u/pcam/.venv/bin"


@pytest.mark.parametrize(
    ("cmdline", "training"),
    [
        ([f"{VENV}/python", f"{VENV}/pcam", "train"], True),  # dvc's `sh -c "pcam train"`
        (["pcam", "--params", "p.yaml", "train"], True),
        ([f"{VENV}/python", "-u", "-m", "pcam_pipeline.cli", "train"], True),  # a launcher's worker
        ([f"{VENV}/python", f"{VENV}/pcam", "evaluate"], False),
        ([f"{VENV}/python", f"{VENV}/dvc", "repro", "train"], False),
        (["/bin/sh", "-c", "pcam train"], False),
        (["srun", "--overlap", f"{VENV}/python", "-m", "pcam_pipeline.cli", "train"], False),
        (
            ["python", "-m", "pcam_pipeline.train.relay", "--stop-file", "f", "--", "dvc", "repro"],
            False,
        ),
        ([], False),
    ],
)
def test_is_training(cmdline: list[str], training: bool):
    assert relay.is_training(cmdline) is training


# Stands in for `pcam train` as a launcher: starts one worker (itself, as `pcam train`) and, like
# distributed.run_workers, forwards SIGUSR1 to it. Each sets its handler after HANDLER_DELAY
# seconds (as the real one imports torch first), then says so with a file in MARKS.
FAKE_LAUNCHER = """
import os, signal, subprocess, sys, time
worker = None
if "WORKER" not in os.environ:
    env = {**os.environ, "WORKER": "1"}
    worker = subprocess.Popen([sys.executable, sys.argv[0], "train"], env=env)
def stop(signum, frame):
    if worker:
        worker.send_signal(signum)
        worker.wait()
    sys.exit(75)
time.sleep(float(os.environ["HANDLER_DELAY"]))
signal.signal(signal.SIGUSR1, stop)
open(os.path.join(os.environ["MARKS"], str(os.getpid())), "w").close()
time.sleep(30)
"""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`sh -c "pcam train"` where that pcam starts a worker; the tree is ended afterwards."""
    pcam = tmp_path / "pcam"
    pcam.write_text(f"#!{sys.executable}\n{FAKE_LAUNCHER}")
    pcam.chmod(0o755)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    monkeypatch.setenv("HANDLER_DELAY", "2")
    shell = subprocess.Popen(["/bin/sh", "-c", f"{pcam} train; exit $?"])
    started = psutil.Process(shell.pid)
    yield shell, marks
    if shell.poll() is None:  # the test failed midway
        for process in started.children(recursive=True):
            process.kill()
        shell.kill()
        shell.wait()


def test_only_the_topmost_training_process_is_signalled(launcher):
    shell, marks = launcher
    wait_until(
        lambda: (
            len([p for p in psutil.Process().children(recursive=True) if p.name() != "sh"]) == 2
        ),
        "the launcher never started its worker",
    )
    (found,) = relay.training_processes(psutil.Process())
    assert psutil.Process(shell.pid).children() == [found]  # the launcher, not its worker

    not_ready: set[int] = set()
    assert not relay.forward_stop(not_ready), "sent before the handler was set"
    assert not_ready == {found.pid}
    wait_until(lambda: len(list(marks.iterdir())) == 2, "the handlers were never set")
    assert relay.handles(found.pid, signal.SIGUSR1)
    assert relay.forward_stop(not_ready)
    assert shell.wait(timeout=20) == 75  # the worker too got it, from the launcher


def test_the_exit_status_is_the_commands(tmp_path: Path):
    stop_file = tmp_path / "stop"
    stop_file.touch()
    assert relay.main(["--stop-file", str(stop_file), "--", "sh", "-c", "exit 3"]) == 3
    assert relay.run(["sh", "-c", "kill -TERM $$"], stop_file) == 128 + signal.SIGTERM


def test_a_request_with_no_training_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture):
    stop_file = tmp_path / "stop"
    stop_file.write_text("USR1\n")
    assert relay.run(["sleep", "0.5"], stop_file) == 0
    assert "SIGUSR1 came while no training ran: nothing was checkpointed" in capsys.readouterr().out
    assert not relay.stop_requested(tmp_path / "absent")
