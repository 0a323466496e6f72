"""The facts of one PCAM split that validate's checks judge: its two files opened, its pixels
scanned, its labels read, each once and only when a check first asks.

The checks themselves are in `checks.py`; a problem found while opening a file (there is no
dataset to hand a check) is the one fact that is a Problem already.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.pcam import PATCH_SHAPE, split_files
from pcam_pipeline.data.scan import CorruptRows, SplitScan, scan_pixels
from pcam_pipeline.params import ValidateParams

REFETCH = "re-run `dvc repro fetch` (or `pcam download` for the real data) to rewrite the file"
# A failure no check foresaw (a read error, a value h5py or numpy rejects) becomes a problem of
# the file being read, never a traceback.
UNEXPECTED = (OSError, ValueError, TypeError, KeyError, RuntimeError)


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


def label_key(value: Any) -> str:
    """A label count's key in the report: "0", "1", "-1", "0.5", "nan"."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


class SplitFacts:
    """One split's two files and what they hold. The properties below `opened` assume the
    checks before them passed (the datasets open, with PCAM's shapes)."""

    def __init__(
        self, directory: Path, split: str, params: ValidateParams, files: contextlib.ExitStack
    ) -> None:
        self.split, self.params, self._files = split, params, files
        self.x_path, self.y_path = split_files(directory, split)

    def problem(
        self,
        check: str,
        path: Path,
        message: str,
        fix: str,
        indices: list[int] | None = None,
        *,
        warning: bool = False,
    ) -> Problem:
        """A problem of this split: an error, or a warning."""
        severity = "warning" if warning else "error"
        return Problem(severity, check, str(path), self.split, message, fix, indices or [])

    # --- the files -------------------------------------------------------------------------------

    @cached_property
    def opened(self) -> dict[str, h5py.Dataset | Problem]:
        """`x` and `y`: each the dataset, or the problem that keeps it from being one."""
        return {"x": self._open(self.x_path, "x"), "y": self._open(self.y_path, "y")}

    def _open(self, path: Path, key: str) -> h5py.Dataset | Problem:
        what = "patches" if key == "x" else "labels"
        try:
            handle = self._files.enter_context(h5py.File(path, "r"))
        except FileNotFoundError:
            return self.problem("missing_file", path, "file not found", REFETCH)
        except OSError as exc:
            message = f"not a readable HDF5 file ({exc}); truncated or corrupt"
            return self.problem("unreadable", path, message, REFETCH)
        try:
            data = handle.get(key)  # None where absent (or a dangling link)
        except UNEXPECTED as exc:  # a broken external link, a corrupt object header
            return self.problem(
                "unreadable", path, f"key '{key}' cannot be opened ({exc})", REFETCH
            )
        if data is None:
            keys = sorted(handle.keys())
            message = (
                f"'{key}' is a link whose target is missing"
                if key in keys
                else f"dataset key '{key}' not found (keys: {keys})"
            )
            return self.problem("missing_key", path, message, f"store the {what} under key '{key}'")
        if isinstance(data, h5py.Dataset):
            return data
        kind = "group" if isinstance(data, h5py.Group) else type(data).__name__
        holds = ""
        if isinstance(data, h5py.Group):
            holds = f" holding {sorted(data.keys())}" if len(data) else " (empty)"
        message = f"'{key}' is an HDF5 {kind}{holds}, not a dataset"
        fix = f"store the {what} as one dataset under key '{key}', not a {kind}"
        return self.problem("not_dataset", path, message, fix)

    @property
    def both_open(self) -> bool:
        return not any(isinstance(found, Problem) for found in self.opened.values())

    @property
    def x(self) -> h5py.Dataset:
        return self.opened["x"]

    @property
    def y(self) -> h5py.Dataset:
        return self.opened["y"]

    @property
    def x_fits(self) -> bool:
        """Patches of PCAM's shape: (N, 96, 96, 3)."""
        return self.x.ndim == 4 and tuple(self.x.shape[1:]) == PATCH_SHAPE

    @property
    def y_fits(self) -> bool:
        """One label per patch: (N, 1, 1, 1), or any shape with one value per row."""
        return bool(self.y.ndim) and int(np.prod(self.y.shape[1:])) == 1

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_labels(self) -> int:
        return int(self.y.shape[0])

    # --- the pixels ------------------------------------------------------------------------------

    @property
    def scannable(self) -> bool:
        return self.x.dtype.kind in "biuf"  # bool, integers, floats

    @cached_property
    def pixels(self) -> SplitScan | CorruptRows | None:
        """One scan of every patch (None for pixels of no number type)."""
        if not self.scannable:
            return None
        try:
            return scan_pixels(self.x_path, self.params)
        except CorruptRows as failure:
            return failure

    @property
    def scan(self) -> SplitScan | None:
        return self.pixels if isinstance(self.pixels, SplitScan) else None

    @property
    def pixel_failure(self) -> CorruptRows | None:
        return self.pixels if isinstance(self.pixels, CorruptRows) else None

    @property
    def looks_scaled(self) -> bool:
        """Float pixels all within [0, 1]."""
        return self.scan is not None and self.x.dtype.kind == "f" and self.scan.maximum <= 1.0

    # --- the labels ------------------------------------------------------------------------------

    @cached_property
    def _labels(self) -> np.ndarray | OSError:
        try:
            return self.y[...].reshape(self.n_labels)
        except OSError as failure:
            return failure

    @property
    def labels(self) -> np.ndarray | None:
        return None if isinstance(self._labels, OSError) else self._labels

    @property
    def label_failure(self) -> OSError | None:
        return self._labels if isinstance(self._labels, OSError) else None

    @property
    def values(self) -> np.ndarray | None:
        """The labels, where they are values to compare (not strings or compounds)."""
        labels = self.labels
        return labels if labels is not None and labels.dtype.kind in "biuf" else None

    @property
    def nan_labels(self) -> np.ndarray | None:
        values = self.values
        if values is None:
            return None
        return np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), dtype=bool)

    @property
    def bad_labels(self) -> np.ndarray | None:
        """Labels that are numbers other than 0 and 1."""
        values, nan = self.values, self.nan_labels
        return None if values is None or nan is None else ~np.isin(values, [0, 1]) & ~nan

    @property
    def positive_fraction(self) -> float:
        assert self.values is not None
        return float((self.values == 1).mean())

    @property
    def label_counts(self) -> dict[str, int]:
        assert self.values is not None
        values, counts = np.unique(self.values, return_counts=True)
        return {label_key(v): int(c) for v, c in zip(values, counts, strict=True)}
