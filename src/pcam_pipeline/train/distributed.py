"""Training on several processes: PyTorch's DistributedDataParallel, started the way Slurm sites
start it, behind the one `pcam train` command that DVC runs.

`pcam train` finds out what it is:
- a **worker**, when a launcher started it: `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT in the environment), `srun` started by `pcam train` itself (PCAM_DIST=srun: rank
  and size from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous on the first node of
  the step), or the local launcher below (PCAM_DIST=local);
- a **launcher**, when it runs in a Slurm allocation of several tasks (`sbatch --ntasks=N`, or
  `--nodes=K --ntasks-per-node=G`): it runs `srun` for the workers; or, outside Slurm, when
  `train.devices` asks for N > 1 processes (`auto`: every visible GPU): it starts N local
  workers (`launch`). It hands them its validated params in the environment
  (params.LAUNCHED_PARAMS_ENV), forwards SIGUSR1/SIGTERM to them and exits with their status
  (75 when they were preempted);
- otherwise a **single process**, exactly as without this module.

NCCL on CUDA (one GPU per worker, `cuda:LOCAL_RANK`), gloo on the CPU. Never NCCL across MIG
instances (slices of one GPU): there training runs one worker (`mig_processes`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pcam_pipeline.errors import EXIT_PREEMPTED, PipelineError, Preempted
from pcam_pipeline.params import LAUNCHED_PARAMS_ENV, Params, TrainParams
from pcam_pipeline.paths import LAST_CHECKPOINT
from pcam_pipeline.runtime import gpu_record, resolve_device
from pcam_pipeline.train.preemption import STOP_SIGNALS

log = logging.getLogger(__name__)
MODE_ENV = "PCAM_DIST"  # set by a launcher for its workers: "local" or "srun"
PORT_ENV = "PCAM_DIST_PORT"  # the rendezvous port a launcher chose
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The process group cannot be formed as asked."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def worker_world(environ: dict[str, str] | None = None) -> World | None:
    """This process's World when a launcher started it as a worker, else None."""
    env = os.environ if environ is None else environ
    mode = env.get(MODE_ENV)
    if mode == "srun":
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]))
    if mode == "local" or all(key in env for key in TORCHRUN_KEYS):
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    return None


def slurm_tasks(environ: dict[str, str] | None = None) -> int:
    """How many tasks the surrounding Slurm allocation has (1 outside Slurm)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return 1
    return int(env.get("SLURM_NTASKS", "1") or 1)


def requested_processes(devices: int | str, cuda: bool) -> int:
    """`train.devices` as a process count: `auto` is every visible GPU (one on the CPU)."""
    if devices == "auto":
        return max(torch.cuda.device_count(), 1) if cuda else 1
    return int(devices)


def uses_cuda(params: TrainParams) -> bool:
    return resolve_device(params.device).type == "cuda"


def training_processes(params: TrainParams) -> int:
    """How many workers a `pcam train` that no launcher started runs: one per task of a Slurm
    allocation, else what `train.devices` asks for; one on MIG slices (`mig_processes`)."""
    cuda = uses_cuda(params)
    tasks, asked = slurm_tasks(), requested_processes(params.devices, cuda)
    processes = max(tasks, asked)
    if not cuda or processes == 1:
        return processes
    facts = gpu_record() or {"mig": False}
    return mig_processes(processes, params.devices, tasks, facts)


def mig_processes(processes: int, devices: int | str, tasks: int, facts: dict[str, Any]) -> int:
    """The worker count on these GPUs (`runtime.mig_facts`): `processes` on whole GPUs. On MIG
    instances NCCL cannot form a process group (it does not run across instances: an error or
    a hang), so `train.devices: auto` trains one worker and says why, and an explicit request
    for several (train.devices: N, or several Slurm tasks) is refused with the fix."""
    if not facts.get("mig") or processes == 1:
        return processes
    slices = f"{facts.get('instances', '?')} MIG instance(s) ({facts.get('profile') or 'MIG'})"
    if devices == "auto" and tasks <= 1:
        log.warning(
            "this job sees %s: NCCL does not run across MIG instances, so training runs one "
            "worker on the first (ask Slurm for one slice, --gpus=1, to leave the others free)",
            slices,
        )
        return 1
    asked = f"train.devices: {devices}" if tasks <= 1 else f"{tasks} Slurm tasks"
    raise WorkersFailed(
        f"{asked} asks for {processes} training workers, but this job's GPUs are {slices}, and "
        "NCCL does not run across MIG instances (DistributedDataParallel would fail or hang). "
        "Fix: train on one slice: train.devices: 1 (or auto) and one task with one GPU "
        "(--ntasks=1 --gpus=1); several workers need whole GPUs (docs/slurm.md#mig-slices)"
    )


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list (`gcn[12-14],gcn20` -> gcn12)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, _, rest = head.partition("[")
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        return head


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rendezvous_port(environ: dict[str, str]) -> int:
    """A port every node computes alike: from the job id, unless the launcher chose one."""
    if PORT_ENV in environ:
        return int(environ[PORT_ENV])
    return 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000


def init(world: World, device_type: str, environ: dict[str, str] | None = None) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and pin the worker's GPU."""
    env = os.environ if environ is None else environ
    if env.get(MODE_ENV) == "srun":
        os.environ.setdefault("MASTER_ADDR", first_host(env["SLURM_STEP_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", str(rendezvous_port(env)))
    if device_type == "cuda":
        # Workers a launcher of another kind (torchrun) started on MIG slices: refuse before
        # NCCL is asked to join them (mig_processes raises for any explicit count above one).
        mig_processes(world.size, world.size, world.size, gpu_record() or {"mig": False})
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"worker {world.rank} has local rank {world.local_rank} but this node shows "
                f"{torch.cuda.device_count()} GPU(s): ask Slurm for one GPU per task "
                "(--gpus-per-task=1, or --gpus-per-node equal to --ntasks-per-node)"
            )
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_stop(local_signal: int | None, device: torch.device) -> int | None:
    """Every worker's stop signal, agreed: the largest signal number any worker received, or
    None. A collective: all workers call it at the same step, so all stop at that step."""
    flag = torch.tensor([local_signal or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None


def gather(value: Any) -> list[Any]:
    """Every worker's `value` (picklable), in rank order, on every worker."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every worker."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Launchers


class WorkersFailed(PipelineError):
    """A training worker failed; the others were stopped."""


def launch(params: Params, processes: int) -> None:
    """Run the train stage as `processes` workers (srun inside a Slurm allocation of several
    tasks, else local processes), with these exact params; raise as one process would."""
    if params.train.batch_size % processes:
        raise WorkersFailed(
            f"train.batch_size {params.train.batch_size} is the global batch and must divide "
            f"evenly over {processes} training processes: use a multiple of {processes} "
            "(or set train.devices)"
        )
    argv = [*(["-v"] if log.isEnabledFor(logging.DEBUG) else []), "train"]
    handed = {LAUNCHED_PARAMS_ENV: json.dumps(params.as_dict())}
    try:
        if slurm_tasks() > 1:
            code = launch_srun(argv, handed)
        else:
            code = launch_local(processes, argv, handed)
    except DistributedError as error:
        raise WorkersFailed(str(error)) from None
    if code == EXIT_PREEMPTED:
        raise Preempted(
            f"the training workers saved {LAST_CHECKPOINT} and stopped: run the train stage "
            "again (`dvc repro`) to resume"
        )
    if code != 0:
        raise WorkersFailed(f"a training worker exited with status {code} (its log is above)")


def worker_environment(
    rank: int, size: int, port: int, handed: Mapping[str, str]
) -> dict[str, str]:
    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    return {
        **os.environ,
        **handed,
        MODE_ENV: "local",
        "RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # Each worker gets its share of the cores (of OMP_NUM_THREADS when set, as the Slurm
        # wrappers do for the whole job): oversubscribed threads slow every step.
        "OMP_NUM_THREADS": str(max(1, threads // size)),
    }


def run_workers(commands: Sequence[tuple[list[str], dict[str, str]]]) -> int:
    """Start the workers, forward stop signals to them, wait; the combined exit status.

    All exit 0: 0. A worker that fails makes the others stop (SIGTERM) and its status is
    returned. Preempted workers (75) give 75.
    """
    workers = [subprocess.Popen(args, env=env) for args, env in commands]

    def forward(signum: int, _frame: object) -> None:
        log.warning(
            "launcher: forwarding %s to %d workers", signal.Signals(signum).name, len(workers)
        )
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        codes: dict[int, int] = {}
        while len(codes) < len(workers):
            for index, worker in enumerate(workers):
                if index in codes:
                    continue
                try:
                    code = worker.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                codes[index] = code
                if code not in (0, EXIT_PREEMPTED):
                    for other in workers:
                        if other.poll() is None:
                            other.terminate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes.values() if code not in (0, EXIT_PREEMPTED)]
    if failed:
        return failed[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes.values() else 0


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command that runs this same `pcam` invocation as a worker."""
    return [sys.executable, "-m", "pcam_pipeline.cli", *argv]


def launch_local(size: int, argv: Sequence[str], handed: Mapping[str, str]) -> int:
    """`size` workers on this machine, each given the variables in `handed`."""
    port = free_port()
    log.info("launching %d local training workers (rendezvous 127.0.0.1:%d)", size, port)
    return run_workers(
        [
            (worker_command(argv), worker_environment(rank, size, port, handed))
            for rank in range(size)
        ]
    )


def launch_srun(argv: Sequence[str], handed: Mapping[str, str]) -> int:
    """One worker per task of the Slurm allocation, through `srun` (which places them on the
    allocation's nodes and binds their GPUs, and passes them this environment with `handed`
    added); the rendezvous on the step's first node."""
    if shutil.which("srun") is None:
        raise DistributedError(
            f"this Slurm allocation has {os.environ.get('SLURM_NTASKS')} tasks, but `srun` is not "
            "on PATH here (inside an Apptainer image it is not): for several nodes run without "
            "the image (unset PCAM_SIF, the venv route); on one node ask for one task and its "
            "GPUs (--ntasks=1 --gpus=4: train.devices auto starts a worker per GPU)"
        )
    env = {**os.environ, **handed, MODE_ENV: "srun"}
    env.setdefault(PORT_ENV, str(rendezvous_port(env)))
    # --overlap: the batch step (dvc, this launcher) keeps its share while the workers run.
    command = ["srun", "--overlap", "--wait=600", *worker_command(argv)]
    log.info("launching %s training workers with srun", os.environ.get("SLURM_NTASKS"))
    return run_workers([(command, env)])
