"""fetch: write the PCAM-format HDF5 files of every split into data/pcam, from the chosen source."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pcam_pipeline.data.download import download_pcam_file
from pcam_pipeline.data.hdf5 import HDF5_METADATA_BYTES, write_pcam_split
from pcam_pipeline.data.pcam import PATCH_BYTES, SPLITS, all_file_names, checksums_from, split_files
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.dvc_state import KnownHashes, known_hashes
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import FetchParams, Params
from pcam_pipeline.paths import PCAM_DIR, RAW_DIR
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


def verify_source_dir(
    source_dir: Path, h5_md5: dict[str, str], known: KnownHashes
) -> dict[Path, str | None]:
    """The six PCAM files in `source_dir`, md5-checked, each with its md5 (None: no expected
    md5, not read); raise naming every problem. An md5 DVC has just computed for the file (as
    fetch.input, a dependency of the stage) is used instead of reading the file again."""
    if not source_dir.is_dir():
        raise SourceError(
            f"fetch.input: {source_dir} is not a directory. Fix: point fetch.input in params.yaml "
            "at the directory holding the camelyonpatch_level_2_split_*.h5 files "
            "(or run `pcam download` to fill data/raw)"
        )
    problems, files = [], {}
    for name in all_file_names():
        path = source_dir / name
        files[path] = None
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif name in h5_md5:
            files[path] = actual = known.md5(path) or md5_file(path)
            if actual != h5_md5[name]:
                problems.append(f"{path}: md5 {actual} != expected {h5_md5[name]}")
    if problems:
        raise SourceError(
            "fetch: the source directory does not hold the expected PCAM files:\n  "
            + "\n  ".join(problems)
            + "\nFix: re-download with `pcam download` (or re-copy the shared files); for files "
            "that are not the official release, give their md5s with fetch.checksums"
        )
    return files


def copied_bytes(sources: list[Path], target_dir: Path, link: str) -> int:
    """The most extra space placing `sources` in `target_dir` takes: every file is copied, but
    with link: hardlink those on the target's file system are only linked."""
    device = os.stat(nearest_existing(target_dir)).st_dev
    writes = []
    for source in sources:
        status = source.stat()
        linked = link == "hardlink" and status.st_dev == device
        writes.append((0 if linked else status.st_size, replaced_bytes(target_dir / source.name)))
    return peak_bytes(writes)


def place(source: Path, target: Path, link: str) -> None:
    """Hard-link (same file system) or copy `source` to `target`, atomically."""
    with atomic_path(target) as tmp:
        if link == "hardlink":
            try:
                os.link(source, tmp)
                return
            except OSError as exc:
                log.info("cannot hard-link %s (%s); copying", source, exc)
        try:
            shutil.copyfile(source, tmp)
        except OSError as exc:  # a disk filled by something else since the check
            raise write_failed(target, exc, SPACE_FIX) from None


def download(params: FetchParams, target_dir: Path = RAW_DIR) -> list[Path]:
    """`pcam download`: the official files (or fetch.zenodo_url's) into data/raw, verified."""
    h5_md5, gz_md5 = checksums_from(params.checksums)
    return [
        download_pcam_file(
            params.zenodo_url, name, target_dir, h5_md5.get(name), gz_md5.get(f"{name}.gz")
        )
        for name in all_file_names()
    ]


def main(params: Params) -> None:
    fetch = params.fetch
    PCAM_DIR.mkdir(parents=True, exist_ok=True)
    if fetch.source == "synthetic":
        write_synthetic(fetch, PCAM_DIR)
        return
    h5_md5, _ = checksums_from(fetch.checksums)
    with known_hashes(PCAM_DIR) as known:
        verified = verify_source_dir(Path(fetch.input), h5_md5, known)
        fix = SPACE_FIX
        if fetch.link == "copy":
            fix += ", or set fetch.link: hardlink with data/pcam on the file system of fetch.input"
        require_free_space(PCAM_DIR, copied_bytes(list(verified), PCAM_DIR, fetch.link), fix)
        for source, md5 in verified.items():
            target = PCAM_DIR / source.name
            place(source, target, fetch.link)
            # A hard link is the verified file itself: DVC need not hash data/pcam again.
            if md5 is not None and os.path.samefile(source, target):
                known.record(target, md5)
    log.info("fetch: %d files from %s (%s)", len(all_file_names()), fetch.input, fetch.source)
