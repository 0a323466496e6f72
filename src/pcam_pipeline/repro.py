"""Reproducibility helpers: seeding, atomic writes, file hashes and provenance."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

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
)


def run_record() -> dict[str, Any]:
    """Where and when a result was made: commit, host, UTC time, job and container."""
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "host": platform.node(),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": {name.lower(): os.environ.get(name) for name in RUN_ENVIRONMENT},
    }


def canonical(value: Any) -> Any:
    """A copy of plain data in which equal strings are one object and no container is shared.

    Pickle writes a back-reference for an object it has seen before (by identity), so the bytes
    of equal data depend on where its strings came from: a key typed in the code, or one read
    back from a checkpoint by a resumed run. Interning every string and rebuilding every
    container makes the pickled bytes a function of the values alone. Tensors are kept as they
    are (torch stores each storage once, by identity, which is already deterministic).
    """
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, OrderedDict):  # module state_dicts: keep the type and the version info
        copy = OrderedDict((canonical(k), canonical(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = canonical(value._metadata)  # type: ignore[attr-defined]
        return copy
    if isinstance(value, dict):
        return {canonical(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, tuple):
        return tuple(canonical(v) for v in value)
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through memory, then an atomic rename: identical state gives identical bytes.

    Saving to a path would embed the (temporary, per-process) file name in the archive; the
    state goes through `canonical` so that a resumed run's checkpoint (whose history was read
    back from disk) has the same bytes as an uninterrupted run's.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(canonical(state), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to load: it holds objects other than tensors and plain data "
            f"({str(exc).splitlines()[0]}). Only load checkpoints written by this pipeline"
        ) from None
