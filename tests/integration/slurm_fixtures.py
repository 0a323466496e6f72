"""Helpers for the Slurm tests: a real Slurm cluster, repositories to submit from.

The cluster is slurm/local-cluster.sh (Debian's slurmctld + slurmd + munged on 127.0.0.1, two fake
GPUs typed as the course's MIG slices, gpu:a100_1g.5gb) in a fresh directory, on free ports; it is
stopped when the session ends. Jobs are submitted with the project's own wrappers (slurm/submit.sh,
slurm/*.sbatch) from clones of the pipeline repository that share its DVC cache, so stages already
computed there are restored from the run-cache and only what a test is about (training, mostly)
runs again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.integration.conftest import free_port, require_integration, run_command

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_SRC = REPO_ROOT / "slurm"
LOCAL_CLUSTER = SLURM_SRC / "local-cluster.sh"
VENV = REPO_ROOT / ".venv"
DVC = VENV / "bin" / "dvc"
APPTAINER_STANDIN = Path(__file__).resolve().parent / "bin" / "apptainer-standin"
NVIDIA_SMI_STANDIN = Path(__file__).resolve().parent / "bin" / "nvidia-smi-standin"

# Small jobs for a 2-core node: one CPU per GPU, so two jobs (two fake GPUs) run side by side.
LOCAL_SITE = """\
# Site file for the local test cluster (slurm/local-cluster.sh): partition ci, 2 CPUs, 4 GB.
SBATCH_PARTITION=ci
SBATCH_CPUS_PER_GPU=1
SBATCH_MEM_PER_NODE=1000M
SBATCH_TIMELIMIT=00:20:00
PCAM_SERVE_PARTITION=ci
"""

GIT_ID = ["-c", "user.name=pcam tests", "-c", "user.email=tests@pcam.invalid"]


def run(
    cmd: list[str | Path],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    return run_command(cmd, cwd=cwd, env=env, check=check, timeout=timeout)


@dataclass
class Job:
    """One record of a job from `sacct -c` (jobcomp/filetxt)."""

    job_id: str
    name: str
    state: str
    exit_code: str
    partition: str


@dataclass
class SlurmCluster:
    directory: Path
    conf: Path
    env: dict[str, str] = field(default_factory=dict)

    def client_env(self, **extra: str) -> dict[str, str]:
        env = {**self.env, **extra}
        return env

    def sacct(self) -> list[Job]:
        """Every job-completion record (`sacct -c`): a requeued job has one per run."""
        out = run(
            ["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State,ExitCode,Partition"],
            env=self.env,
        ).stdout
        return [Job(*line.split("|")[:5]) for line in out.splitlines() if line.count("|") >= 4]

    def records(self, job_id: str) -> list[Job]:
        return [job for job in self.sacct() if job.job_id == job_id]

    def completions(self) -> list[dict[str, str]]:
        """Every jobcomp record, all its fields (TimeLimit in minutes, Tres, ArrayTaskId, ...)."""
        log = self.directory / "log" / "jobcomp.log"
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in log.read_text().splitlines()]

    def completion(self, job_id: str) -> dict[str, str]:
        """The last jobcomp record of one job."""
        return [record for record in self.completions() if record.get("JobId") == job_id][-1]

    def array_tasks(self, array_id: str) -> dict[int, dict[str, str]]:
        """The final jobcomp record of each task of a job array (sacct -c shows only task ids)."""
        tasks: dict[int, dict[str, str]] = {}
        for record in self.completions():
            if record.get("ArrayJobId") == array_id:
                tasks[int(record["ArrayTaskId"])] = record
        return tasks

    def in_queue(self, job_id: str) -> bool:
        result = run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=self.env, check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    def wait(self, job_id: str, timeout: float = 1200, log: Path | None = None) -> Job:
        """Wait until the job (all tasks of an array) left the queue; return its last record."""
        deadline = time.monotonic() + timeout
        while self.in_queue(job_id):
            if time.monotonic() > deadline:
                run(["scancel", job_id], env=self.env, check=False)
                tail = log.read_text()[-4000:] if log and log.exists() else "(no log)"
                raise AssertionError(f"job {job_id} still queued after {timeout} s; log:\n{tail}")
            time.sleep(1)
        # The completion record is written as the job leaves the queue; allow a moment.
        for _ in range(20):
            records = self.records(job_id)
            if records and records[-1].state not in ("PENDING", "RUNNING", "REQUEUED"):
                return records[-1]
            time.sleep(0.5)
        return records[-1] if records else Job(job_id, "?", "UNKNOWN", "?", "?")


@contextmanager
def local_cluster(directory: Path) -> Iterator[SlurmCluster]:
    """A real one-node Slurm cluster from slurm/local-cluster.sh in DIRECTORY, on free ports."""
    if os.geteuid() != 0:
        require_integration("the local Slurm cluster needs root (slurmd, munged)")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SBATCH_", "SLURM_", "PCAM_SIF", "PCAM_STAGE", "PCAM_SLURM"))
    }
    env.update(
        PCAM_SLURM_DIR=str(directory),
        PCAM_SLURM_CTLD_PORT=str(free_port()),
        PCAM_SLURM_SLURMD_PORT=str(free_port()),
    )
    installed = run([LOCAL_CLUSTER, "install"], env=env, check=False, timeout=900)
    if installed.returncode != 0:
        require_integration(f"cannot install Slurm: {installed.stderr.strip()[-2000:]}")
    started = run([LOCAL_CLUSTER, "start"], env=env, check=False, timeout=120)
    if started.returncode != 0:
        run([LOCAL_CLUSTER, "stop"], env=env, check=False)
        logs = "\n".join(p.read_text()[-2000:] for p in (directory / "log").glob("*.log"))
        require_integration(f"cannot start Slurm: {started.stderr.strip()}\n{logs}")
    conf = directory / "etc" / "slurm.conf"
    env["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(directory, conf, env)
    finally:
        run([LOCAL_CLUSTER, "stop"], env=env, check=False)


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    return run([DVC, *args], cwd=repo, env=env, check=check)


def make_submit_repo(pipeline_repo: Path, target: Path) -> Path:
    """The pipeline repository as a user has it after `dvc repro` and a commit (dvc.lock and the
    git-tracked results of the local run), plus this working tree's slurm/ (the wrappers under
    test, committed or not yet)."""
    run(["git", "clone", "-q", pipeline_repo, target])
    # The repository's own identity: the jobs' `dvc exp save` must not depend on this machine's
    # global git config (a CI container has none).
    for key, value in (("user.name", "pcam tests"), ("user.email", "tests@pcam.invalid")):
        run(["git", "config", key, value], cwd=target)
    files = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=pipeline_repo
    ).stdout.split("\0")
    for name in filter(None, files):
        if (pipeline_repo / name).is_file() and name != "repro.log":
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pipeline_repo / name, target / name)
    shutil.rmtree(target / "slurm", ignore_errors=True)
    shutil.copytree(SLURM_SRC, target / "slurm")
    run(["git", "add", "-A"], cwd=target)
    if run(["git", "status", "--porcelain"], cwd=target).stdout.strip():
        run(
            ["git", *GIT_ID, "commit", "-q", "-m", "local dvc repro; slurm wrappers under test"],
            cwd=target,
        )
    return target


@dataclass
class Workspace:
    """A repository to submit from (see make_workspace)."""

    path: Path
    cluster: SlurmCluster
    env: dict[str, str]

    def submit(self, *args: str, **extra_env: str) -> str:
        """`slurm/submit.sh ARGS...` from this workspace; returns the job id."""
        env = {**self.env, **extra_env}
        result = run([self.path / "slurm" / "submit.sh", *args], cwd=self.path, env=env)
        job_id = result.stdout.strip().splitlines()[-1]
        assert job_id.isdigit(), f"submit.sh printed {result.stdout!r}, stderr {result.stderr!r}"
        return job_id

    def commit(self, message: str) -> None:
        """Commit the workspace's changes: jobs run the submitted commit, in a clone."""
        run(["git", *GIT_ID, "commit", "-q", "-am", message], cwd=self.path)

    def apply(self, experiment: str) -> None:
        """A job's results (pushed back as an experiment) into the workspace, as docs/slurm.md
        says: a branch of the experiment, merged, and its outputs from the shared cache. (`dvc exp
        apply` stops at data/raw, which the default pipeline never downloads.)"""
        dvc(self.path, "exp", "branch", experiment, experiment)
        run(["git", "merge", "-q", "--ff-only", experiment], cwd=self.path)
        dvc(self.path, "checkout", "--allow-missing")

    def log(self, name: str) -> Path:
        return self.path / "logs" / name


def lock_outs(lock: Path) -> dict[str, dict[str, str]]:
    """stage -> {out path: md5} from a dvc.lock."""
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {
        name: {out["path"]: out["md5"] for out in stage.get("outs", [])}
        for name, stage in stages.items()
    }


def same_value(a: object, b: object) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(same_value, a, b))
    return bool(a == b)


def same_checkpoint(a: Path, b: Path) -> bool:
    """Bit-identical training state (weights, optimizer, position, RNG, ...). The library
    versions a checkpoint records (its `provenance`) may differ between an image and the host,
    so that record is left out of the comparison."""
    import torch

    left, right = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    for checkpoint in (left, right):
        checkpoint.pop("provenance", None)
    return same_value(left, right)


def output_differences(repo: Path, reference: Path) -> list[str]:
    """Outputs in REPO's dvc.lock that differ from REFERENCE's (a local, uninterrupted run)."""
    ours, theirs = lock_outs(repo / "dvc.lock"), lock_outs(reference / "dvc.lock")
    if ours.keys() != theirs.keys():
        return [f"stages {sorted(ours)} != {sorted(theirs)}"]
    differences = []
    for stage, outs in ours.items():
        if outs.keys() != theirs[stage].keys():
            differences.append(f"{stage}: outputs {sorted(outs)} != {sorted(theirs[stage])}")
            continue
        for path, md5 in outs.items():
            if md5 == theirs[stage][path]:
                continue
            if path.endswith(".pt") and same_checkpoint(repo / path, reference / path):
                continue
            differences.append(f"{stage}: {path} {md5} != {theirs[stage][path]}")
    return differences


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def local_threads() -> str:
    """The CPU threads torch used in the local run (the same environment, no OMP_NUM_THREADS set
    there means torch's default). Training on the CPU is bit-reproducible only with the same
    thread count, so jobs compared with the local run get this many."""
    if threads := os.environ.get("OMP_NUM_THREADS"):
        return threads
    code = "import torch; print(torch.get_num_threads())"
    return run([VENV / "bin" / "python", "-c", code]).stdout.strip()


def cache_dir(repo: Path) -> Path:
    return Path(dvc(repo, "cache", "dir").stdout.strip().splitlines()[-1])


def cache_without_training(cache: Path, repo: Path, target: Path) -> Path:
    """A copy of CACHE (hard links) without REPO's checkpoints and without the run-cache: a job
    that uses it restores the data stages from it but must really train (from scratch: there is
    no models/last.pt to resume from)."""
    run(["cp", "-al", cache, target])
    shutil.rmtree(target / "runs", ignore_errors=True)
    for md5 in lock_outs(repo / "dvc.lock")["train"].values():
        (target / "files" / "md5" / md5[:2] / md5[2:]).unlink(missing_ok=True)
    return target


def make_workspace(cluster: SlurmCluster, submit_repo: Path, cache: Path, tmp: Path) -> Workspace:
    """A clone of SUBMIT_REPO to submit from: the project venv (symlink), CACHE as its DVC cache
    (outputs checked out from it), the local cluster's site file, and a node-local TMPDIR."""
    path = tmp / "repo"
    run(["git", "clone", "-q", submit_repo, path])
    (path / ".venv").symlink_to(VENV)
    dvc(path, "cache", "dir", "--local", str(cache))
    # The local run's outputs from the shared cache (data/raw, never downloaded, is missing).
    dvc(path, "checkout", "--allow-missing")
    site = tmp / "local-site.env"
    site.write_text(LOCAL_SITE)
    node_tmp = tmp / "node-tmp"
    node_tmp.mkdir()
    env = cluster.client_env(PCAM_SLURM_SITE=str(site), TMPDIR=str(node_tmp), DVC_NO_ANALYTICS="1")
    return Workspace(path, cluster, env)


def wait_for_line(
    path: Path, pattern: str, timeout: float, cluster: SlurmCluster, job_id: str
) -> str:
    """Wait until a line of the job log matches PATTERN (regex); fail early if the job ended."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern, re.MULTILINE)
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if match := regex.search(text):
            return match.group(0)
        if not cluster.in_queue(job_id):
            raise AssertionError(f"job {job_id} ended before /{pattern}/ appeared:\n{text[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"/{pattern}/ not in {path} after {timeout} s")
