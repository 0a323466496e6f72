"""The checkpoint file format: what `torch.save` writes for this pipeline and how a file is
loaded back, refused (objects other than tensors and plain data) or found damaged (cut short,
changed after it was written). What a checkpoint holds and when a run resumes from one is
resume.py's; the data stages depend on neither."""

from __future__ import annotations

import datetime
import os
import pickle
import re
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import (
    CheckpointError,
    DamagedCheckpoint,
    RefusedCheckpoint,
    first_sentence,
)
from pcam_pipeline.repro import atomic_path


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
