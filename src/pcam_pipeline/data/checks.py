"""validate's checks: an ordered table of small checks over the facts of one split, each
returning its problems (`validation.py` runs them, then the check across splits).

Fatal problems have severity "error"; the `check` of each, as reports/validate.json names it:

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

Soft problems (class imbalance, blank patches, duplicates within a split) are warnings whose
thresholds are params. No malformed input ends in a traceback: a check that fails unexpectedly
reports the file it was reading as unreadable. To add a check: write a function of
(SplitFacts, ValidateParams) returning its problems and put it in SPLIT_CHECKS where what it
needs is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pcam_pipeline.data.facts import REFETCH, Problem, SplitFacts
from pcam_pipeline.data.scan import MAX_LISTED, first_indices
from pcam_pipeline.params import ValidateParams

NONFINITE_FIX = "drop or repair these patches at the source"
NEGATIVE_FIX = "store the raw image, uint8 0..255 (undo the normalisation at the source)"
RANGE_FIX = (
    "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so preprocess clips "
    "to [0, 255]"
)
LABEL_FIX = "PCAM labels are 0 (normal) or 1 (tumour in the centre region); relabel or drop these"

Checker = Callable[[SplitFacts, ValidateParams], list[Problem]]


# --- the files and their shapes ------------------------------------------------------------------


def files_open(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    return [found for found in split.opened.values() if isinstance(found, Problem)]


def shapes(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    """PCAM's shapes: (N, 96, 96, 3) patches, one label per patch (x judged first)."""
    if not split.x_fits:
        message = f"x has shape {tuple(split.x.shape)}, expected (N, 96, 96, 3)"
        fix = "write patches as (N, 96, 96, 3) channels-last RGB"
        return [split.problem("shape", split.x_path, message, fix)]
    if not split.y_fits:
        message = f"y has shape {tuple(split.y.shape)}, expected (N, 1, 1, 1)"
        return [split.problem("shape", split.y_path, message, "write one label per patch")]
    return []


def not_empty(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    fix = "every split needs patches of both classes; " + REFETCH
    files = ((split.x_path, split.x, "patches"), (split.y_path, split.y, "labels"))
    return [
        split.problem("empty", path, f"an empty split: 0 {what} (shape {tuple(data.shape)})", fix)
        for path, data, what in files
        if data.shape[0] == 0
    ]


def lengths_match(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    if split.n_labels == split.n:
        return []
    message = f"{split.n_labels} labels for {split.n} patches in {split.x_path.name}"
    fix = "x and y must come from the same release; " + REFETCH
    return [split.problem("length_mismatch", split.y_path, message, fix)]


# --- the pixels ----------------------------------------------------------------------------------


def pixel_dtype(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    dtype = split.x.dtype
    if not split.scannable:
        message = f"pixel dtype {dtype} is not a number type"
        fix = "re-create the file with uint8 pixels"
        return [split.problem("dtype", split.x_path, message, fix)]
    if dtype == np.uint8:
        return []
    message = (
        f"pixel dtype {dtype}, expected uint8 (the known dataset poisoning: wider or float "
        "pixels carry values a uint8 image cannot)"
    )
    fix = (
        "re-create the file as uint8, or set validate.allow_unsafe_dtype: true so preprocess "
        "clips to [0, 255] and casts"
    )
    return [split.problem("dtype", split.x_path, message, fix, warning=params.allow_unsafe_dtype)]


def pixels_readable(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    failure = split.pixel_failure
    if failure is None:
        return []
    spans = ", ".join(f"{lo}..{hi - 1}" for lo, hi in failure.ranges)
    message = f"patches {spans} cannot be read ({failure.cause}): a corrupt chunk or data cut short"
    indices = [i for lo, hi in failure.ranges for i in range(lo, hi)][:MAX_LISTED]
    return [split.problem("corrupt", split.x_path, message, REFETCH, indices)]


def pixel_values(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    """Pixels that are not finite, below 0 or above 255: values no uint8 image holds."""
    scan, path = split.scan, split.x_path
    if scan is None:
        return []
    problems = []
    if scan.nonfinite:
        message, fix = "pixels are not finite (NaN, +Inf or -Inf)", NONFINITE_FIX
        problems.append(split.problem("nonfinite", path, message, fix, scan.nonfinite))
    if scan.negative:
        message = (
            f"negative pixel values (min {scan.minimum}): raw pixels are 0..255 intensities, "
            "these look normalised"
        )
        problems.append(split.problem("negative", path, message, NEGATIVE_FIX, scan.negative))
    if scan.above_255:
        message = f"pixel values outside [0, 255] (min {scan.minimum}, max {scan.maximum})"
        allowed = params.allow_unsafe_dtype
        problems.append(
            split.problem("range", path, message, RANGE_FIX, scan.above_255, warning=allowed)
        )
    return problems


def not_scaled(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    scan = split.scan
    if scan is None or not split.looks_scaled:
        return []
    message = (
        f"float pixels all within [{scan.minimum:.4g}, {scan.maximum:.4g}]: an image scaled to "
        "[0, 1], not raw 0..255 intensities"
    )
    fix = "multiply by 255 and store as uint8 (np.round(x * 255).astype(np.uint8))"
    return [split.problem("scaled", split.x_path, message, fix)]


def few_blank(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    scan = split.scan
    # A scaled image looks all black: that is the scaled check's finding, not this one's.
    if scan is None or split.looks_scaled:
        return []
    fraction = scan.blank_count / max(scan.n, 1)
    if fraction <= params.max_blank_fraction:
        return []
    message = f"{scan.blank_count} all-black/all-white patches ({fraction:.2%})"
    fix = "preprocess drops them (preprocess.drop_blank)"
    return [split.problem("blank", split.x_path, message, fix, scan.blank, warning=True)]


def few_duplicates(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    scan = split.scan
    if scan is None or len(scan.duplicates) / max(scan.n, 1) <= params.max_duplicate_fraction:
        return []
    message = f"{len(scan.duplicates)} exact duplicate patches within the split"
    fix, later = "deduplicate at the source", [index for _, index in scan.duplicates]
    return [split.problem("duplicates", split.x_path, message, fix, later, warning=True)]


# --- the labels ----------------------------------------------------------------------------------


def labels_readable(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    failure = split.label_failure
    if failure is None:
        return []
    message = f"labels cannot be read ({failure}): a corrupt chunk or data cut short"
    return [split.problem("corrupt", split.y_path, message, REFETCH)]


def label_dtype(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    labels = split.labels
    if labels is None or labels.dtype.kind in "iu":
        return []
    message = f"label dtype {labels.dtype}, expected an integer dtype (PCAM stores uint8)"
    fix = "store the labels as uint8 0/1 (y.astype(np.uint8), once they are whole numbers)"
    return [split.problem("label_dtype", split.y_path, message, fix)]


def no_nan_labels(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    nan = split.nan_labels
    if nan is None or not nan.any():
        return []
    message = f"NaN labels ({int(nan.sum())} of {len(nan)})"
    return [split.problem("labels", split.y_path, message, LABEL_FIX, first_indices(nan))]


def labels_zero_or_one(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    bad = split.bad_labels
    if bad is None or not bad.any():
        return []
    assert split.values is not None
    values = np.unique(split.values[bad]).tolist()[:MAX_LISTED]
    message = f"labels {values} outside {{0, 1}}"
    return [split.problem("labels", split.y_path, message, LABEL_FIX, first_indices(bad))]


def both_classes(split: SplitFacts, params: ValidateParams) -> list[Problem]:
    """One class only (unless other label problems explain it), else a lopsided balance."""
    values = split.values
    if values is None:
        return []
    classes = np.unique(values)
    assert split.bad_labels is not None and split.nan_labels is not None
    if len(classes) == 1 and not (split.bad_labels.any() or split.nan_labels.any()):
        only = int(classes[0])
        message = (
            f"all {len(values)} labels are {only} ({'tumour' if only else 'normal'}): one class "
            "only in the split"
        )
        fix = (
            "a split needs both classes (AUROC and the threshold are undefined otherwise): "
            "re-create it from the whole split, or set validate.allow_single_class: true"
        )
        allowed = params.allow_single_class
        return [split.problem("single_class", split.y_path, message, fix, warning=allowed)]
    if abs(split.positive_fraction - 0.5) <= params.max_class_imbalance:
        return []
    message = f"positive fraction {split.positive_fraction:.3f} (PCAM is 0.5)"
    fix = "check the split; raise validate.max_class_imbalance if intended"
    return [split.problem("class_balance", split.y_path, message, fix, warning=True)]


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    run: Checker
    reads: Literal["x", "y"]  # the file an unforeseen failure is reported against
    stops: bool = False  # a problem here leaves the checks after it nothing to look at


SPLIT_CHECKS: tuple[Check, ...] = (
    Check(files_open, "x", stops=True),
    Check(shapes, "x", stops=True),
    Check(not_empty, "x", stops=True),
    Check(lengths_match, "x"),
    Check(pixel_dtype, "x"),
    Check(pixels_readable, "x"),
    Check(pixel_values, "x"),
    Check(not_scaled, "x"),
    Check(few_blank, "x"),
    Check(few_duplicates, "x"),
    Check(labels_readable, "y"),
    Check(label_dtype, "y"),
    Check(no_nan_labels, "y"),
    Check(labels_zero_or_one, "y"),
    Check(both_classes, "y"),
)
