"""Reproducibility helpers: seeding, atomic writes, file hashes and provenance."""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.errors import (
    NoSpace,
    PipelineError,
)

HASH_BLOCK = 1 << 20


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it onto `final` only if the block succeeds.

    A crash, a kill or an exception leaves `final` as it was (absent or the previous version),
    never half written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators and turn on deterministic algorithms."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    # cuBLAS needs this for deterministic matmuls; it must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions(names: tuple[str, ...] = ("torch", "numpy", "h5py", "dvc")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


# Set inside Apptainer (the image file), by the Slurm wrappers (the image and its sha256, hashed
# once per job) and by Slurm: where a run happened, never what it made.
RUN_ENVIRONMENT = (
    "APPTAINER_CONTAINER",
    "PCAM_IMAGE",
    "PCAM_IMAGE_DIGEST",
    "SLURM_JOB_ID",
    "SLURM_JOB_PARTITION",
    "SLURM_CLUSTER_NAME",
    "SLURM_JOB_NODELIST",
    "SLURM_CPUS_PER_TASK",
    "SLURM_JOB_GPUS",
)


def run_environment() -> dict[str, str | None]:
    """The container and the job a result was made in (RUN_ENVIRONMENT, by lower-case name):
    recorded beside checkpoints and in every measurement."""
    return {name.lower(): os.environ.get(name) for name in RUN_ENVIRONMENT}


def run_record() -> dict[str, Any]:
    """Where and when a result was made: commit, host, UTC time, job and container."""
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "host": platform.node(),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": run_environment(),
    }


# --- free space ---------------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """1.2 GB, 34.5 MB, 600.0 kB: decimal units, as `df -H` counts them."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if count >= size / 10:
            return f"{count / size:.1f} {unit}"
    return f"{count / 1e3:.1f} kB"


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest directory above it that exists (what will hold it)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (which must exist)."""
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def require_free_space(target: Path, needed: int, fix: str) -> None:
    """Raise NoSpace, before anything is written, unless the file system that will hold
    `target` (a file or directory, which need not exist yet) has `needed` bytes free."""
    holder = nearest_existing(target)
    free = shutil.disk_usage(holder).free
    if free < needed:
        raise NoSpace(
            f"{target} needs about {human_bytes(needed)} but the file system at "
            f"{mount_point(holder)} has {human_bytes(free)} free; nothing was written. "
            f"Fix: {fix}"
        )


def write_failed(final: Path, error: OSError, fix: str) -> PipelineError:
    """The error for a write of `final` (through a temporary name) that failed: NoSpace, naming
    the file system and its size, for a full disk or quota; else what the OS said."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        holder = nearest_existing(final)
        size = human_bytes(shutil.disk_usage(holder).total)
        return NoSpace(
            f"{final}: the file system at {mount_point(holder)} ({size} in all) filled up while "
            f"it was written ({error.strerror}); the partial file was removed and nothing was "
            f"written under its final name. Fix: {fix}"
        )
    return PipelineError(
        f"{final}: writing failed ({error}); the partial file was removed and nothing was "
        f"written under its final name. Fix: {fix}"
    )
