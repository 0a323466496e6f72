"""fetch's work: data/pcam filled from the chosen source, all or nothing, with the free space it
needs checked first. The synthetic source's files are generated and written; a directory's
(fetch.input) are verified against their md5s and hard-linked or copied into place, and DVC's
state told their md5s so that DVC hashes none of them again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcam_pipeline.data.hashing import copy_hashed
from pcam_pipeline.data.hdf5 import HDF5_METADATA_BYTES, write_pcam_split
from pcam_pipeline.data.pcam import PATCH_BYTES, SPLITS, all_file_names, checksums_from, split_files
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.dvc.state import KnownHashes, known_hashes
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import FetchParams
from pcam_pipeline.repro import (
    atomic_path,
    md5_file,
    nearest_existing,
    require_free_space,
    write_failed,
)

log = logging.getLogger(__name__)


class SourceError(PipelineError):
    """The configured source does not hold the expected, verified PCAM files."""


SPACE_FIX = "free space there, or point data/pcam at a larger file system (a symlink)"


def fill_pcam_dir(params: FetchParams, out_dir: Path) -> None:
    """The six PCAM files of `params.source` in `out_dir`: written (synthetic) or placed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if params.source == "synthetic":
        write_synthetic(params, out_dir)
        return
    h5_md5, _ = checksums_from(params.checksums)
    files = source_files(Path(params.input), h5_md5, params.checksums)
    fix = SPACE_FIX
    if params.link == "copy":
        fix += ", or set fetch.link: hardlink with data/pcam on the file system of fetch.input"
    require_free_space(out_dir, copied_bytes(list(files), out_dir, params.link), fix)
    with known_hashes(out_dir) as known:
        place_all(files, out_dir, params.link, known)
    log.info("fetch: %d files from %s (%s)", len(files), params.input, params.source)


def replaced_bytes(target: Path) -> int:
    """What renaming a new file onto `target` frees: its size, unless another hard link (the
    source, the DVC cache) keeps the data."""
    try:
        status = target.stat()
    except FileNotFoundError:
        return 0
    return status.st_size if status.st_nlink == 1 else 0


def peak_bytes(writes: list[tuple[int, int]]) -> int:
    """The most extra space a sequence of (bytes written, bytes freed once renamed into place)
    file replacements holds at any moment: each new file is complete before its old one goes."""
    peak = held = 0
    for written, freed in writes:
        held += written
        peak = max(peak, held)
        held -= freed
    return peak


def synthetic_writes(params: FetchParams, out_dir: Path) -> list[tuple[int, int]]:
    """(at most the bytes written, the bytes freed) for each file `write_synthetic` writes."""
    writes = []
    for split in SPLITS:
        patches = getattr(params.sizes, split)
        x_path, y_path = split_files(out_dir, split)
        x_bytes = patches * PATCH_BYTES
        writes.append((x_bytes + HDF5_METADATA_BYTES, replaced_bytes(x_path)))
        writes.append((patches + HDF5_METADATA_BYTES, replaced_bytes(y_path)))
    return writes


def write_synthetic(params: FetchParams, out_dir: Path) -> None:
    require_free_space(out_dir, peak_bytes(synthetic_writes(params, out_dir)), SPACE_FIX)
    for split in SPLITS:
        size = getattr(params.sizes, split)
        x, y = generate_split(params.seed, split, size, params.positive_fraction)
        write_pcam_split(out_dir, split, x, y)
        log.info("synthetic %s: %d patches, %d positive", split, size, int(y.sum()))


def source_files(source_dir: Path, h5_md5: dict[str, str], checksums: str) -> dict[Path, str]:
    """The six PCAM files in `source_dir`, each with the md5 it must have; raise naming every
    problem: not a directory, a file missing, a file `checksums` gives no md5 for."""
    if not source_dir.is_dir():
        raise SourceError(
            f"fetch.input: {source_dir} is not a directory. Fix: point fetch.input in params.yaml "
            "at the directory holding the camelyonpatch_level_2_split_*.h5 files "
            "(or run `pcam download` to fill data/raw)"
        )
    problems, files = [], {}
    for name in all_file_names():
        path = source_dir / name
        if name not in h5_md5:
            problems.append(f"{checksums}: no md5 for {name}")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        else:
            files[path] = h5_md5[name]
    if problems:
        raise SourceError(
            "fetch: the source cannot be verified:\n  "
            + "\n  ".join(problems)
            + "\nFix: re-download with `pcam download` (or re-copy the shared files); files that "
            f"are not the official release need every md5 in fetch.checksums (`md5sum FILE >> "
            f"{checksums}`)"
        )
    return files


def copied_bytes(sources: list[Path], target_dir: Path, link: str) -> int:
    """The most extra space placing `sources` in `target_dir` takes: every file is copied, but
    with link: hardlink those on the target's file system are only linked. The old files go
    only once every new one is in place."""
    device = os.stat(nearest_existing(target_dir)).st_dev
    return sum(
        0 if link == "hardlink" and source.stat().st_dev == device else source.stat().st_size
        for source in sources
    )


@dataclass(frozen=True)
class Placed:
    """A file of the source placed under a temporary name: its md5, and the file as DVC's state
    knows it when that md5 was taken (None: a new copy, hashed as it was written)."""

    md5: str
    linked_as_of: dict[str, Any] | None


def place_verified(source: Path, tmp: Path, link: str, known: KnownHashes) -> Placed:
    """Hard-link `source` to `tmp` (link: hardlink, same file system) or copy it, and return the
    md5 of what is now at `tmp`: a link's from DVC's state or one read of the file, a copy's
    computed while writing it (one read of the source for both)."""
    if link == "hardlink":
        try:
            os.link(source, tmp)
        except OSError as exc:
            log.info("cannot hard-link %s (%s); copying", source, exc)
        else:
            as_of = known.file_info(tmp)  # before reading: a change meanwhile voids the record
            return Placed(known.md5(source) or md5_file(tmp), as_of)
    try:
        return Placed(copy_hashed(source, tmp), None)
    except OSError as exc:  # a disk filled by something else since the check
        raise write_failed(tmp.with_name(source.name), exc, SPACE_FIX) from None


def place_all(files: dict[Path, str], target_dir: Path, link: str, known: KnownHashes) -> None:
    """Every verified file of the source in `target_dir`, all or nothing: each goes to a
    temporary name, is checked against its md5, and all are renamed into place only if every
    one matches. DVC's state then holds each file's md5, so DVC hashes none of them again."""
    placed: dict[Path, Placed] = {}
    problems = []
    with contextlib.ExitStack() as renames:
        for source, expected in files.items():
            tmp = renames.enter_context(atomic_path(target_dir / source.name))
            placed[source] = done = place_verified(source, tmp, link, known)
            if done.md5 != expected:
                problems.append(f"{source}: md5 {done.md5} != expected {expected}")
        if problems:
            raise SourceError(
                "fetch: the source directory does not hold the expected PCAM files:\n  "
                + "\n  ".join(problems)
                + "\nFix: re-download with `pcam download` (or re-copy the shared files); for "
                "files that are not the official release, give their md5s with fetch.checksums"
            )
    for source, done in placed.items():
        known.record(target_dir / source.name, done.md5, done.linked_as_of)
        if done.linked_as_of is not None:  # the same file: a later fetch reads nothing
            known.record(source, done.md5, done.linked_as_of)
