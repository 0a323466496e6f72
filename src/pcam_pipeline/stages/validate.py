"""validate: check every split of data/pcam and write reports/validate.json.

Fatal problems (unreadable files, wrong keys, shapes or dtypes, NaN/Inf, out-of-range pixels,
labels outside {0,1}, x/y length mismatch, patches shared between splits) make the stage exit
non-zero with one line per problem naming the file, split, index and fix. Soft problems (class
imbalance, blank patches, duplicates within a split) are warnings whose thresholds are params.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.hdf5 import PatchBlocks, scan_blocks
from pcam_pipeline.data.pcam import PATCH_SHAPE, SPLITS, split_files
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import Params, ValidateParams
from pcam_pipeline.paths import PCAM_DIR, VALIDATE_REPORT
from pcam_pipeline.repro import write_json

log = logging.getLogger(__name__)
MAX_LISTED = 20  # indices listed per problem in the report

REFETCH = "re-run `dvc repro fetch` (or `pcam download` for the real data) to rewrite the file"


class ValidationFailed(PipelineError):
    """The dataset has fatal problems; the message has one line per problem."""


@dataclass(frozen=True)
class Problem:
    severity: str  # error | warning
    check: str
    file: str
    split: str
    message: str
    fix: str
    indices: list[int] = field(default_factory=list)

    def line(self) -> str:
        where = f" index {self.indices[0]}" if self.indices else ""
        more = f" (+{len(self.indices) - 1} more)" if len(self.indices) > 1 else ""
        return (
            f"{self.severity.upper()} {self.file} [{self.split}]{where}{more}: "
            f"{self.message}. Fix: {self.fix}"
        )


def blank_mask(x: np.ndarray, black_level: int, white_level: int) -> np.ndarray:
    """True for patches that are all black (every pixel <= black) or all white (>= white)."""
    flat = x.reshape(len(x), -1)
    return (flat.max(axis=1) <= black_level) | (flat.min(axis=1) >= white_level)


HASH_SEED = 0x5043414D  # fixed, so a patch's hash is the same in every run and every split
SUBBLOCK = 64  # patches scanned at a time: each pass over them finds them in the CPU cache


def hash_keys(row_bytes: int) -> np.ndarray:
    """One odd 32-bit multiplier per 4-byte word of a patch."""
    if row_bytes % 4:
        raise ValueError(f"patch size {row_bytes} bytes is not a multiple of 4")
    rng = np.random.default_rng(HASH_SEED)
    return rng.integers(0, 2**32, row_bytes // 4, dtype=np.uint32) | np.uint32(1)


def patch_hashes(x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A 32-bit multilinear hash of each patch's bytes: the sum of word * key, modulo 2**32.

    Vectorised, it costs a fifth of SHA-256 per patch. Equal patches always hash equal; a pair of
    unequal ones collides with odds of about 2**-32, and every equal hash is confirmed byte for
    byte before it is reported: a collision costs one re-read, never a false duplicate.
    """
    words = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint32)
    if words.shape[1] != len(keys):
        raise ValueError(f"{words.shape[1]} words per patch for {len(keys)} hash keys")
    hashes = np.empty(len(x), dtype=np.uint32)
    products = np.empty((min(SUBBLOCK, len(x)), len(keys)), dtype=np.uint32)
    for start in range(0, len(x), SUBBLOCK):
        rows = words[start : start + SUBBLOCK]
        np.multiply(rows, keys, out=products[: len(rows)])
        np.sum(
            products[: len(rows)], axis=1, dtype=np.uint32, out=hashes[start : start + len(rows)]
        )
    return hashes


def first_indices(mask: np.ndarray, offset: int = 0) -> list[int]:
    return [int(i) + offset for i in np.flatnonzero(mask)[:MAX_LISTED]]


@dataclass(frozen=True)
class BlockScan:
    """Per-patch findings for one block: minimum, maximum, non-finite flag, hash."""

    low: np.ndarray
    high: np.ndarray
    nonfinite: np.ndarray | None  # None for integer pixels
    hashes: np.ndarray


def scan_block(block: np.ndarray, keys: np.ndarray) -> BlockScan:
    """Every check of one block, SUBBLOCK patches at a time (three passes, one memory read)."""
    n = len(block)
    flat = block.reshape(n, -1)
    is_float = np.issubdtype(block.dtype, np.floating)
    low, high = np.empty(n, dtype=block.dtype), np.empty(n, dtype=block.dtype)
    nonfinite = np.zeros(n, dtype=bool) if is_float else None
    hashes = np.empty(n, dtype=np.uint32)
    for start in range(0, n, SUBBLOCK):
        stop = min(start + SUBBLOCK, n)
        part = flat[start:stop]
        hashes[start:stop] = patch_hashes(part, keys)
        if nonfinite is not None:
            finite = np.isfinite(part)
            nonfinite[start:stop] = ~finite.all(axis=1)
            part = np.where(finite, part, 0)
        np.min(part, axis=1, out=low[start:stop])
        np.max(part, axis=1, out=high[start:stop])
    return BlockScan(low, high, nonfinite, hashes)


@dataclass
class SplitScan:
    """What one pass over a split's pixels found."""

    n: int
    blank: list[int] = field(default_factory=list)
    blank_count: int = 0
    nonfinite: list[int] = field(default_factory=list)
    out_of_range: list[int] = field(default_factory=list)
    minimum: float = float("inf")
    maximum: float = float("-inf")
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint32))
    duplicates: list[tuple[int, int]] = field(default_factory=list)


def scan_pixels(path: Path, params: ValidateParams) -> SplitScan:
    """One pass over the `x` dataset of `path`, block by block in threads (bounded memory)."""
    with PatchBlocks(path, "x") as reader:
        scan = SplitScan(n=reader.length, hashes=np.empty(reader.length, dtype=np.uint32))
        keys = hash_keys(reader.row_bytes)
        for part, _, found in scan_blocks(
            reader, params.block_patches, lambda rows, _: scan_block(rows, keys), zero_copy=True
        ):
            if found.nonfinite is not None:
                scan.nonfinite += first_indices(found.nonfinite, part.start)[
                    : MAX_LISTED - len(scan.nonfinite)
                ]
            low, high = found.low, found.high
            scan.minimum = min(scan.minimum, float(low.min()))
            scan.maximum = max(scan.maximum, float(high.max()))
            outside = (low < 0) | (high > 255)
            scan.out_of_range += first_indices(outside, part.start)[
                : MAX_LISTED - len(scan.out_of_range)
            ]
            blank = (high <= params.black_level) | (low >= params.white_level)
            scan.blank_count += int(blank.sum())
            scan.blank += first_indices(blank, part.start)[: MAX_LISTED - len(scan.blank)]
            scan.hashes[part] = found.hashes
        scan.duplicates = confirmed_duplicates(scan.hashes, reader)
    return scan


def equal_hash_groups(hashes: np.ndarray) -> list[np.ndarray]:
    """Indices (ascending) of each set of two or more patches with the same hash."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(ordered)])
    pairs = zip(starts.tolist(), sizes.tolist(), strict=True)
    return [order[start : start + size] for start, size in pairs if size > 1]


def confirmed_duplicates(hashes: np.ndarray, reader: PatchBlocks) -> list[tuple[int, int]]:
    """(first, later) index pairs of byte-identical patches, in the order of `later`."""
    pairs = []
    for group in equal_hash_groups(hashes):
        first_seen: dict[bytes, int] = {}
        for index in group.tolist():
            first = first_seen.setdefault(reader.read(index, index + 1).tobytes(), index)
            if first != index:
                pairs.append((first, index))
    return sorted(pairs, key=lambda pair: pair[1])


def check_split(
    directory: Path, split: str, params: ValidateParams
) -> tuple[dict[str, Any], list[Problem], np.ndarray | None]:
    """Check one split's two files; return its summary, its problems and its patch hashes."""
    x_path, y_path = split_files(directory, split)
    problems: list[Problem] = []

    def problem(
        severity: str,
        check: str,
        path: Path,
        message: str,
        fix: str,
        indices: list[int] | None = None,
    ) -> None:
        problems.append(Problem(severity, check, str(path), split, message, fix, indices or []))

    summary: dict[str, Any] = {"x_file": str(x_path), "y_file": str(y_path)}
    handles = {}
    for path, key in ((x_path, "x"), (y_path, "y")):
        try:
            handle = h5py.File(path, "r")
        except FileNotFoundError:
            problem("error", "missing_file", path, "file not found", REFETCH)
            continue
        except OSError as exc:
            problem(
                "error",
                "unreadable",
                path,
                f"not a readable HDF5 file ({exc}); truncated or corrupt",
                REFETCH,
            )
            continue
        if key not in handle:
            problem(
                "error",
                "missing_key",
                path,
                f"dataset key '{key}' not found (keys: {sorted(handle.keys())})",
                f"store the {'patches' if key == 'x' else 'labels'} under key '{key}'",
            )
            handle.close()
            continue
        handles[key] = handle
    if len(handles) < 2:
        for handle in handles.values():
            handle.close()
        return summary, problems, None

    try:
        x, y = handles["x"]["x"], handles["y"]["y"]
        summary.update(
            x_shape=list(x.shape), x_dtype=str(x.dtype), y_shape=list(y.shape), y_dtype=str(y.dtype)
        )
        if x.ndim != 4 or tuple(x.shape[1:]) != PATCH_SHAPE:
            problem(
                "error",
                "shape",
                x_path,
                f"x has shape {tuple(x.shape)}, expected (N, 96, 96, 3)",
                "write patches as (N, 96, 96, 3) channels-last RGB",
            )
            return summary, problems, None
        labels = y[...].reshape(len(y), -1) if y.ndim else np.empty((0, 1))
        if labels.shape[1] != 1:
            problem(
                "error",
                "shape",
                y_path,
                f"y has shape {tuple(y.shape)}, expected (N, 1, 1, 1)",
                "write one label per patch",
            )
            return summary, problems, None
        labels = labels[:, 0]
        if len(labels) != x.shape[0]:
            problem(
                "error",
                "length_mismatch",
                y_path,
                f"{len(labels)} labels for {x.shape[0]} patches in {x_path.name}",
                "x and y must come from the same release; " + REFETCH,
            )

        if x.dtype != np.uint8:
            severity = "warning" if params.allow_unsafe_dtype else "error"
            problem(
                severity,
                "dtype",
                x_path,
                f"pixel dtype {x.dtype}, expected uint8 (the known dataset poisoning: wider "
                "or float pixels carry values a uint8 image cannot)",
                "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so "
                "preprocess clips to [0, 255] and casts",
            )
        scan = scan_pixels(x_path, params)
        if scan.nonfinite:
            problem(
                "error",
                "nonfinite",
                x_path,
                "pixels are NaN or Inf",
                "drop or repair these patches at the source",
                scan.nonfinite,
            )
        if scan.out_of_range:
            severity = "warning" if params.allow_unsafe_dtype else "error"
            problem(
                severity,
                "range",
                x_path,
                f"pixel values outside [0, 255] (min {scan.minimum}, max {scan.maximum})",
                "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so "
                "preprocess clips to [0, 255]",
                scan.out_of_range,
            )

        values, counts = np.unique(labels, return_counts=True)
        bad_labels = ~np.isin(labels, [0, 1])
        if bad_labels.any():
            problem(
                "error",
                "labels",
                y_path,
                f"labels {sorted(set(values.tolist()) - {0, 1})} outside {{0, 1}}",
                "PCAM labels are 0 (normal) or 1 (tumour in the centre region)",
                first_indices(bad_labels),
            )
        positive_fraction = float((labels == 1).mean()) if len(labels) else 0.0
        if abs(positive_fraction - 0.5) > params.max_class_imbalance:
            problem(
                "warning",
                "class_balance",
                y_path,
                f"positive fraction {positive_fraction:.3f} (PCAM is 0.5)",
                "check the split; raise validate.max_class_imbalance if intended",
            )
        blank_fraction = scan.blank_count / max(scan.n, 1)
        if blank_fraction > params.max_blank_fraction:
            problem(
                "warning",
                "blank",
                x_path,
                f"{scan.blank_count} all-black/all-white patches ({blank_fraction:.2%})",
                "preprocess drops them (preprocess.drop_blank)",
                scan.blank,
            )
        duplicate_fraction = len(scan.duplicates) / max(scan.n, 1)
        if duplicate_fraction > params.max_duplicate_fraction:
            problem(
                "warning",
                "duplicates",
                x_path,
                f"{len(scan.duplicates)} exact duplicate patches within the split",
                "deduplicate at the source",
                [later for _, later in scan.duplicates],
            )
        summary.update(
            n=scan.n,
            label_counts={str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
            positive_fraction=positive_fraction,
            pixel_min=scan.minimum,
            pixel_max=scan.maximum,
            blank_count=scan.blank_count,
            blank_indices=scan.blank,
            duplicates_within=len(scan.duplicates),
        )
        return summary, problems, scan.hashes
    finally:
        for handle in handles.values():
            handle.close()


def find_leakage(
    hashes: dict[str, np.ndarray], files: dict[str, Path]
) -> dict[tuple[str, str], list[int]]:
    """For each pair of splits, the indices (in the later split) of patches also in the earlier:
    equal hashes, confirmed byte for byte."""
    leaks: dict[tuple[str, str], list[int]] = {}
    names = [s for s in SPLITS if s in hashes]
    with contextlib.ExitStack() as stack:
        readers: dict[str, PatchBlocks] = {}

        def patch(split: str, index: int) -> bytes:
            if split not in readers:
                readers[split] = stack.enter_context(PatchBlocks(files[split], "x"))
            return readers[split].read(index, index + 1).tobytes()

        for i, earlier in enumerate(names):
            by_hash: dict[int, list[int]] = {}  # filled when a later split first needs it
            for later in names[i + 1 :]:
                candidates = np.flatnonzero(np.isin(hashes[later], hashes[earlier]))
                if not len(candidates):
                    continue
                if not by_hash:
                    for index, value in enumerate(hashes[earlier].tolist()):
                        by_hash.setdefault(value, []).append(index)
                shared = []
                for index in candidates.tolist():
                    mine = patch(later, index)
                    twins = by_hash[int(hashes[later][index])]
                    if any(patch(earlier, twin) == mine for twin in twins):
                        shared.append(index)
                if shared:
                    leaks[(earlier, later)] = shared
    return leaks


def validate_dir(directory: Path, params: ValidateParams) -> dict[str, Any]:
    splits, problems, hashes = {}, [], {}
    for split in SPLITS:
        summary, split_problems, split_hashes = check_split(directory, split, params)
        splits[split] = summary
        problems += split_problems
        if split_hashes is not None:
            hashes[split] = split_hashes
    files = {split: split_files(directory, split)[0] for split in hashes}
    leakage = find_leakage(hashes, files)
    for (earlier, later), indices in leakage.items():
        problems.append(
            Problem(
                "error" if params.fail_on_leakage else "warning",
                "leakage",
                str(split_files(directory, later)[0]),
                later,
                f"{len(indices)} patches also present in the {earlier} split (train/test leakage)",
                "remove them from one of the splits, or set validate.fail_on_leakage: false",
                indices[:MAX_LISTED],
            )
        )
    return {
        "ok": not any(p.severity == "error" for p in problems),
        "splits": splits,
        "leakage": {f"{a}/{b}": len(ix) for (a, b), ix in leakage.items()},
        "problems": [asdict(p) for p in problems],
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
    }


def main(params: Params) -> None:
    report = validate_dir(PCAM_DIR, params.validate_)
    write_json(VALIDATE_REPORT, report)
    lines = [Problem(**p).line() for p in report["problems"]]
    for line in lines:
        log.warning(line)
    if not report["ok"]:
        fatal = [line for line in lines if line.startswith("ERROR")]
        raise ValidationFailed(
            f"{len(fatal)} fatal problem(s) in {PCAM_DIR} (details in {VALIDATE_REPORT}):\n"
            + "\n".join(fatal)
        )
    log.info("validate: %s ok (%d warnings)", PCAM_DIR, report["warnings"])
