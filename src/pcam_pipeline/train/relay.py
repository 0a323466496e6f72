"""`python -m pcam_pipeline.train.relay --stop-file FILE -- COMMAND...`: run COMMAND (a
`dvc repro` or `dvc exp run`) so that a stop request reaches the `pcam train` it starts.
Exits with COMMAND's status.

Why a relay: Slurm's time-limit warning (`--signal=B:USR1@600`, or `scancel --signal=USR1
--batch`) goes to the batch script alone, and DVC does not pass signals on to a stage: the chain
is dvc -> `sh -c` -> `pcam train`, and SIGUSR1 to dvc or the shell would kill them. So the batch
script's trap (slurm/lib.sh) only writes into FILE, and this relay, the parent of the whole
command, sends SIGUSR1 to training as soon as there is a training process and it has set its
handler: a signal that comes before training, between two stages, or while Python still imports
torch (when SIGUSR1 would kill training instead of making it checkpoint) is neither lost nor fatal.
Only the topmost `pcam train` is signalled; a launcher (several workers) forwards to its own.

SIGTERM needs no relay: `scancel` sends it to every process of the job. The relay runs where the
command runs (the job's venv, or inside the Apptainer image), so it sees the processes it started.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from pcam_pipeline.errors import EXIT_PREEMPTED

STOP = signal.SIGUSR1
POLL_SECONDS = 0.2  # how soon a request, or a training process's handler, is noticed
TRAIN_MODULE = "pcam_pipeline.cli"  # what a launcher runs its workers as


def say(message: str) -> None:
    """One line of the job's log, in the shape of slurm/lib.sh's own."""
    print(f"[pcam-slurm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def is_training(cmdline: Sequence[str]) -> bool:
    """Whether a command line is `pcam train`: the console script, or Python running it or
    `-m pcam_pipeline.cli`. Shells and dvc, whose command lines also hold `train`, are not."""
    if not cmdline:
        return False
    program, args = Path(cmdline[0]).name, list(cmdline[1:])
    if program.startswith("python"):
        while args and args[0].startswith("-") and args[0] != "-m":  # interpreter options
            args.pop(0)
        if args[:2] == ["-m", TRAIN_MODULE]:
            args = args[2:]
        elif args and Path(args[0]).name == "pcam":
            args = args[1:]
        else:
            return False
    elif program != "pcam":
        return False
    return "train" in args


def handles(pid: int, signum: int) -> bool:
    """Whether process `pid` has set a handler for `signum` (the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone already
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def training_processes(root: psutil.Process) -> list[psutil.Process]:
    """The `pcam train` processes below `root` that no other `pcam train` started."""
    found, queue = [], root.children()
    while queue:
        process = queue.pop()
        try:
            if is_training(process.cmdline()):
                found.append(process)
            else:
                queue.extend(process.children())
        except psutil.Error:  # it ended while we looked
            continue
    return found


def stop_requested(stop_file: Path) -> bool:
    """Whether the batch script's trap has written the request (the file is empty until then)."""
    try:
        return stop_file.stat().st_size > 0
    except FileNotFoundError:
        return False


def forward_stop(not_ready: set[int]) -> bool:
    """Send the stop signal to each topmost `pcam train` below this process that has its handler
    set; True when one got it. `not_ready`: the pids already reported as not ready yet."""
    delivered = False
    for process in training_processes(psutil.Process()):
        if not handles(process.pid, STOP):
            if process.pid not in not_ready:
                not_ready.add(process.pid)
                name = STOP.name
                say(f"training (pid {process.pid}) has not set its {name} handler yet; retrying")
            continue
        say(
            f"forwarding {STOP.name} to training (pid {process.pid}): it saves models/last.pt "
            f"and exits {EXIT_PREEMPTED}"
        )
        try:
            process.send_signal(STOP)
            delivered = True
        except psutil.NoSuchProcess:
            continue
    return delivered


def exit_status(child: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The child's exit status as a shell gives it (128 + N when killed by signal N), or None
    while it runs on after `timeout` seconds."""
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return code if code >= 0 else 128 - code


def run(command: Sequence[str], stop_file: Path) -> int:
    """Run `command`, relaying a stop request written to `stop_file`; its exit status."""
    child = subprocess.Popen(command)
    delivered = False
    not_ready: set[int] = set()
    while (status := exit_status(child, POLL_SECONDS)) is None:
        if not delivered and stop_requested(stop_file):
            delivered = forward_stop(not_ready)
    if not delivered and stop_requested(stop_file):
        say(f"{STOP.name} came while no training ran: nothing was checkpointed")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam_pipeline.train.relay", description=__doc__
    )
    parser.add_argument(
        "--stop-file",
        type=Path,
        required=True,
        help="empty until a stop is requested; then training gets SIGUSR1",
    )
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    args = parser.parse_args(argv)
    return run(args.command, args.stop_file)


if __name__ == "__main__":
    sys.exit(main())
