"""Reproducibility helpers: seeding, atomic writes, file hashes and provenance."""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import pickle
import platform
import random
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.errors import (
    CheckpointError,
    DamagedCheckpoint,
    NoSpace,
    PipelineError,
    RefusedCheckpoint,
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


# What torch.load raises for a file that is not a whole checkpoint, found by loading empty files,
# a checkpoint cut at every fortieth of its length, random bytes, text and plain pickles: the zip
# reader's RuntimeError, OSError (EINVAL for an archive cut short), EOFError (empty), and the
# unpickler's errors for bytes that are no pickle. The rest are what a damaged pickle stream
# can raise on its way.
LOAD_FAILURES = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    struct.error,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)
# How the weights-only unpickler words a refusal: the pickle imports a global (a function or
# class, by its dotted name), calls one, or builds an object. Anything else it rejects is damage,
# as is a "global" with spaces in its name: text that starts with "c", the GLOBAL opcode.
REFUSALS = re.compile(
    r"GLOBAL \S+ (was not an allowed|whose module)|call reduce|create new object|Can only build"
)


def first_sentence(text: str, limit: int = 200) -> str:
    """What an error message says before its advice (torch's run to paragraphs)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")[:limit]


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code.

    Raises RefusedCheckpoint for a pickle of other objects (nothing of it runs), and
    DamagedCheckpoint for a file that is empty, cut short, changed since it was written, or no
    checkpoint at all.
    """
    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror})") from None
    except pickle.UnpicklingError as exc:
        # torch wraps the unpickler's own error (the one that says what it met) in advice
        detail = str(exc.__context__ if exc.__context__ is not None else exc)
        # A flipped byte can turn a global's name into one the unpickler does not know: that
        # is damage, and the archive's CRCs tell it from a pickle written that way.
        changed = archive_damage(path)
        if REFUSALS.search(detail) and changed is None:
            raise RefusedCheckpoint(
                path,
                "refused to load: it holds objects other than tensors and plain data "
                f"({first_sentence(detail)})",
            ) from None
        raise DamagedCheckpoint(path, changed or damage(path, exc, detail)) from None
    except LOAD_FAILURES as exc:
        raise DamagedCheckpoint(path, damage(path, exc, str(exc))) from None
    if not isinstance(checkpoint, dict):
        raise DamagedCheckpoint(
            path, f"not a checkpoint of this pipeline (it holds a {type(checkpoint).__name__})"
        )
    # torch never checks the archive's CRCs: bytes changed inside a tensor (a bad sector, bit
    # rot) would load as silently wrong weights. It costs one more read (0.06 s for 200 MB).
    changed = archive_damage(path)
    if changed is not None:
        raise DamagedCheckpoint(path, changed)
    return checkpoint


def archive_damage(path: Path) -> str | None:
    """How the zip archive of a torch checkpoint is damaged (a record whose CRC does not match,
    a directory that cannot be read), or None: whole, or no zip archive at all."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (*LOAD_FAILURES, NotImplementedError) as exc:
        return damage(path, exc, str(exc))
    if corrupt is None:
        return None
    return (
        f"not a complete checkpoint: the CRC of its record {corrupt} does not match (its bytes "
        "changed after it was written)"
    )


def damage(path: Path, exc: BaseException, detail: str) -> str:
    """Why a file is no checkpoint, in a few words: its size and what the loader said."""
    size = path.stat().st_size if path.exists() else 0
    said = first_sentence(detail) or "unexpected end of file"
    return f"not a complete checkpoint: {size} bytes, {type(exc).__name__}: {said}"


def move_aside(path: Path, label: str) -> Path:
    """Rename `path` to `<name>.<label>-<UTC time>` beside it and return the new path.

    Never a deletion: the file may be all that is left of a long run, or evidence of how it got
    there."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    again = 1
    while target.exists():  # two in the same second
        target = path.with_name(f"{path.name}.{label}-{stamp}-{again}")
        again += 1
    os.replace(path, target)
    return target


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
