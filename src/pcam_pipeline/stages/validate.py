"""validate: check every split of data/pcam and write reports/validate.json.

Fatal problems make the stage exit non-zero with one line per problem naming the file, split,
index (where one applies) and fix; the `check` of each in reports/validate.json:

- missing_file, unreadable: a file that is absent, not HDF5, truncated, or fails to be checked;
- missing_key, not_dataset: no `x` / `y` key, or one that is an HDF5 group, not a dataset;
- shape, empty, length_mismatch: not (N,96,96,3) / (N,1,1,1), N = 0, or x and y lengths differ;
- corrupt: data that fails mid-read (a corrupt compressed chunk), with the unreadable patches;
- dtype: pixels that are not uint8 (the poisoning; a warning with validate.allow_unsafe_dtype);
- nonfinite, negative, range: NaN/+Inf/-Inf pixels, pixels below 0, above 255 (range: a warning
  with validate.allow_unsafe_dtype);
- scaled: float pixels all within [0, 1], a scaled image passed off as raw 0..255 intensities;
- label_dtype, labels: labels of a non-integer dtype (float, string...), NaN, negative or
  outside {0, 1};
- single_class: a split (train, valid or test) holding one class only (a warning with
  validate.allow_single_class);
- leakage: patches shared between splits (a warning with validate.fail_on_leakage: false).

No malformed input ends in a traceback: a read that fails unexpectedly is itself a problem.
Soft problems (class imbalance, blank patches, duplicates within a split) are warnings whose
thresholds are params. The pixel checks come from one threaded pass of block scans (per-patch
minimum, maximum and non-finite flag), however many checks use them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
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
    negative: list[int] = field(default_factory=list)
    above_255: list[int] = field(default_factory=list)
    minimum: float = float("inf")
    maximum: float = float("-inf")
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint32))
    duplicates: list[tuple[int, int]] = field(default_factory=list)


class CorruptRows(Exception):
    """Patches of a dataset that cannot be read: a corrupt chunk, a file truncated mid-data."""

    def __init__(self, ranges: list[tuple[int, int]], cause: OSError) -> None:
        super().__init__(f"rows {ranges} cannot be read: {cause}")
        self.ranges, self.cause = ranges, cause


def unreadable_rows(reader: PatchBlocks, rows: slice) -> list[tuple[int, int]]:
    """The `[start, stop)` runs of whole chunks overlapping `rows` that fail to read, probed one
    chunk at a time (only once a block failed: it costs one more read of that block)."""
    step = reader.chunk_rows
    if not step:
        return [(rows.start, rows.stop)]
    bad: list[tuple[int, int]] = []
    for lo in range(rows.start // step * step, rows.stop, step):
        hi = min(lo + step, reader.length)
        try:
            reader.read(lo, hi)
        except OSError:
            if bad and bad[-1][1] == lo:
                bad[-1] = (bad[-1][0], hi)
            else:
                bad.append((lo, hi))
    return bad or [(rows.start, rows.stop)]


def scan_pixels(path: Path, params: ValidateParams) -> SplitScan:
    """One pass over the `x` dataset of `path`, block by block in threads (bounded memory).

    Raises CorruptRows, naming the unreadable patches, where a block fails to read.
    """
    with PatchBlocks(path, "x") as reader:
        scan = SplitScan(n=reader.length, hashes=np.empty(reader.length, dtype=np.uint32))
        keys = hash_keys(reader.row_bytes)
        scanned = 0  # blocks come in file order: a failure is in the block starting here
        try:
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
                scan.negative += first_indices(low < 0, part.start)[
                    : MAX_LISTED - len(scan.negative)
                ]
                scan.above_255 += first_indices(high > 255, part.start)[
                    : MAX_LISTED - len(scan.above_255)
                ]
                blank = (high <= params.black_level) | (low >= params.white_level)
                scan.blank_count += int(blank.sum())
                scan.blank += first_indices(blank, part.start)[: MAX_LISTED - len(scan.blank)]
                scan.hashes[part] = found.hashes
                scanned = part.stop
        except OSError as exc:  # h5py's read of a corrupt chunk, or a short read
            failed = slice(scanned, min(scanned + params.block_patches, reader.length))
            raise CorruptRows(unreadable_rows(reader, failed), exc) from exc
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


LABEL_FIX = "PCAM labels are 0 (normal) or 1 (tumour in the centre region); relabel or drop these"
# A failure no check foresaw (a read error, a value h5py or numpy rejects) becomes a problem of
# the file being read, never a traceback.
UNEXPECTED = (OSError, ValueError, TypeError, KeyError, RuntimeError)


def label_key(value: Any) -> str:
    """A label count's key in the report: "0", "1", "-1", "0.5", "nan"."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def check_labels(
    labels: np.ndarray, y_path: Path, params: ValidateParams, problem: Callable[..., None]
) -> dict[str, Any]:
    """Report the label problems of one split through `problem`; return its label summary."""
    kind = labels.dtype.kind
    if kind not in "iu":
        problem(
            "error",
            "label_dtype",
            y_path,
            f"label dtype {labels.dtype}, expected an integer dtype (PCAM stores uint8)",
            "store the labels as uint8 0/1 (y.astype(np.uint8), once they are whole numbers)",
        )
        if kind not in "bf":
            return {}  # strings, compounds: no values to compare
    nan = np.isnan(labels) if kind == "f" else np.zeros(len(labels), dtype=bool)
    if nan.any():
        problem(
            "error",
            "labels",
            y_path,
            f"NaN labels ({int(nan.sum())} of {len(labels)})",
            LABEL_FIX,
            first_indices(nan),
        )
    bad = ~np.isin(labels, [0, 1]) & ~nan
    if bad.any():
        problem(
            "error",
            "labels",
            y_path,
            f"labels {np.unique(labels[bad]).tolist()[:MAX_LISTED]} outside {{0, 1}}",
            LABEL_FIX,
            first_indices(bad),
        )
    values, counts = np.unique(labels, return_counts=True)
    positive_fraction = float((labels == 1).mean())
    if len(values) == 1 and not (bad.any() or nan.any()):
        only = int(values[0])
        name = "tumour" if only else "normal"
        problem(
            "warning" if params.allow_single_class else "error",
            "single_class",
            y_path,
            f"all {len(labels)} labels are {only} ({name}): one class only in the split",
            "a split needs both classes (AUROC and the threshold are undefined otherwise): "
            "re-create it from the whole split, or set validate.allow_single_class: true",
        )
    elif abs(positive_fraction - 0.5) > params.max_class_imbalance:
        problem(
            "warning",
            "class_balance",
            y_path,
            f"positive fraction {positive_fraction:.3f} (PCAM is 0.5)",
            "check the split; raise validate.max_class_imbalance if intended",
        )
    return {
        "label_counts": {label_key(v): int(c) for v, c in zip(values, counts, strict=True)},
        "positive_fraction": positive_fraction,
    }


def open_datasets(
    x_path: Path, y_path: Path, files: contextlib.ExitStack, problem: Callable[..., None]
) -> dict[str, h5py.Dataset]:
    """The `x` and `y` datasets that open (their files closed with `files`); a problem for each
    that does not."""
    datasets: dict[str, h5py.Dataset] = {}
    for path, key in ((x_path, "x"), (y_path, "y")):
        what = "patches" if key == "x" else "labels"
        try:
            handle = files.enter_context(h5py.File(path, "r"))
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
        try:
            data = handle.get(key)  # None where absent (or a dangling link)
        except UNEXPECTED as exc:  # a broken external link, a corrupt object header
            problem("error", "unreadable", path, f"key '{key}' cannot be opened ({exc})", REFETCH)
            continue
        if data is None:
            keys = sorted(handle.keys())
            problem(
                "error",
                "missing_key",
                path,
                f"'{key}' is a link whose target is missing"
                if key in keys
                else f"dataset key '{key}' not found (keys: {keys})",
                f"store the {what} under key '{key}'",
            )
        elif not isinstance(data, h5py.Dataset):
            kind = "group" if isinstance(data, h5py.Group) else type(data).__name__
            holds = ""
            if isinstance(data, h5py.Group):
                holds = f" holding {sorted(data.keys())}" if len(data) else " (empty)"
            problem(
                "error",
                "not_dataset",
                path,
                f"'{key}' is an HDF5 {kind}{holds}, not a dataset",
                f"store the {what} as one dataset under key '{key}', not a {kind}",
            )
        else:
            datasets[key] = data
    return datasets


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
    with contextlib.ExitStack() as files:
        datasets = open_datasets(x_path, y_path, files, problem)
        if len(datasets) < 2:
            return summary, problems, None
        reading = x_path  # the file a failure no check foresaw is reported against
        try:
            x, y = datasets["x"], datasets["y"]
            summary.update(
                x_shape=list(x.shape),
                x_dtype=str(x.dtype),
                y_shape=list(y.shape),
                y_dtype=str(y.dtype),
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
            if y.ndim == 0 or int(np.prod(y.shape[1:])) != 1:
                problem(
                    "error",
                    "shape",
                    y_path,
                    f"y has shape {tuple(y.shape)}, expected (N, 1, 1, 1)",
                    "write one label per patch",
                )
                return summary, problems, None
            n, n_labels = int(x.shape[0]), int(y.shape[0])
            summary.update(n=n)
            for path, data, what in ((x_path, x, "patches"), (y_path, y, "labels")):
                if data.shape[0] == 0:
                    problem(
                        "error",
                        "empty",
                        path,
                        f"an empty split: 0 {what} (shape {tuple(data.shape)})",
                        "every split needs patches of both classes; " + REFETCH,
                    )
            if n == 0 or n_labels == 0:
                return summary, problems, None
            if n_labels != n:
                problem(
                    "error",
                    "length_mismatch",
                    y_path,
                    f"{n_labels} labels for {n} patches in {x_path.name}",
                    "x and y must come from the same release; " + REFETCH,
                )

            scannable = x.dtype.kind in "biuf"  # bool, integers, floats
            if not scannable:
                problem(
                    "error",
                    "dtype",
                    x_path,
                    f"pixel dtype {x.dtype} is not a number type",
                    "re-create the file with uint8 pixels",
                )
            elif x.dtype != np.uint8:
                problem(
                    "warning" if params.allow_unsafe_dtype else "error",
                    "dtype",
                    x_path,
                    f"pixel dtype {x.dtype}, expected uint8 (the known dataset poisoning: wider "
                    "or float pixels carry values a uint8 image cannot)",
                    "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so "
                    "preprocess clips to [0, 255] and casts",
                )
            scan = None
            if scannable:
                try:
                    scan = scan_pixels(x_path, params)
                except CorruptRows as exc:
                    spans = ", ".join(f"{lo}..{hi - 1}" for lo, hi in exc.ranges)
                    problem(
                        "error",
                        "corrupt",
                        x_path,
                        f"patches {spans} cannot be read ({exc.cause}): a corrupt chunk or data "
                        "cut short",
                        REFETCH,
                        [i for lo, hi in exc.ranges for i in range(lo, hi)][:MAX_LISTED],
                    )
            if scan is not None:
                check_pixels(scan, x.dtype, x_path, params, problem)

            reading = y_path
            try:
                labels = y[...].reshape(n_labels)
            except OSError as exc:
                problem(
                    "error",
                    "corrupt",
                    y_path,
                    f"labels cannot be read ({exc}): a corrupt chunk or data cut short",
                    REFETCH,
                )
            else:
                summary.update(check_labels(labels, y_path, params, problem))
            if scan is None:
                return summary, problems, None
            summary.update(
                pixel_min=scan.minimum,
                pixel_max=scan.maximum,
                blank_count=scan.blank_count,
                blank_indices=scan.blank,
                duplicates_within=len(scan.duplicates),
            )
            return summary, problems, scan.hashes
        except UNEXPECTED as exc:
            log.debug("validate: %s", reading, exc_info=True)
            problem(
                "error",
                "unreadable",
                reading,
                f"cannot be checked ({type(exc).__name__}: {exc})",
                REFETCH,
            )
            return summary, problems, None


def check_pixels(
    scan: SplitScan,
    dtype: np.dtype,
    x_path: Path,
    params: ValidateParams,
    problem: Callable[..., None],
) -> None:
    """Report the pixel problems one scan of a split found through `problem`."""
    if scan.nonfinite:
        problem(
            "error",
            "nonfinite",
            x_path,
            "pixels are not finite (NaN, +Inf or -Inf)",
            "drop or repair these patches at the source",
            scan.nonfinite,
        )
    if scan.negative:
        problem(
            "error",
            "negative",
            x_path,
            f"negative pixel values (min {scan.minimum}): raw pixels are 0..255 intensities, "
            "these look normalised",
            "store the raw image, uint8 0..255 (undo the normalisation at the source)",
            scan.negative,
        )
    if scan.above_255:
        problem(
            "warning" if params.allow_unsafe_dtype else "error",
            "range",
            x_path,
            f"pixel values outside [0, 255] (min {scan.minimum}, max {scan.maximum})",
            "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so "
            "preprocess clips to [0, 255]",
            scan.above_255,
        )
    scaled = dtype.kind == "f" and scan.maximum <= 1.0
    if scaled:
        problem(
            "error",
            "scaled",
            x_path,
            f"float pixels all within [{scan.minimum:.4g}, {scan.maximum:.4g}]: an image scaled to "
            "[0, 1], not raw 0..255 intensities",
            "multiply by 255 and store as uint8 (np.round(x * 255).astype(np.uint8))",
        )
    blank_fraction = scan.blank_count / max(scan.n, 1)
    if blank_fraction > params.max_blank_fraction and not scaled:  # scaled: all look black
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
    try:
        leakage = find_leakage(hashes, files)
    except UNEXPECTED as exc:  # every file read once already: changed while validate ran?
        log.debug("validate: leakage", exc_info=True)
        leakage = {}
        problems.append(
            Problem(
                "error",
                "unreadable",
                str(directory),
                "all",
                f"the cross-split check failed ({type(exc).__name__}: {exc})",
                "do not rewrite the files while validate runs; re-run `pcam validate`",
            )
        )
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
    problems = [Problem(**p) for p in report["problems"]]
    for problem in problems:
        log.log(logging.ERROR if problem.severity == "error" else logging.WARNING, problem.line())
    if not report["ok"]:
        fatal = [problem.line() for problem in problems if problem.severity == "error"]
        raise ValidationFailed(
            f"{len(fatal)} fatal problem(s) in {PCAM_DIR} (details in {VALIDATE_REPORT}):\n"
            + "\n".join(fatal)
        )
    log.info("validate: %s ok (%d warnings)", PCAM_DIR, report["warnings"])
