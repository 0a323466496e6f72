"""validate's work: the checks of `checks.SPLIT_CHECKS` on every split, then the check across
splits (patches shared between them, leakage), as the report reports/validate.json holds."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.data.checks import SPLIT_CHECKS
from pcam_pipeline.data.facts import REFETCH, UNEXPECTED, Problem, SplitFacts
from pcam_pipeline.data.pcam import SPLITS, split_files
from pcam_pipeline.data.scan import MAX_LISTED, find_leakage
from pcam_pipeline.params import ValidateParams

log = logging.getLogger(__name__)


def run_checks(split: SplitFacts, params: ValidateParams) -> tuple[list[Problem], bool]:
    """Every check of SPLIT_CHECKS in order, up to the first that stops; the problems, and
    whether every check ran."""
    problems: list[Problem] = []
    for check in SPLIT_CHECKS:
        try:
            found = check.run(split, params)
        except UNEXPECTED as exc:
            path = split.x_path if check.reads == "x" else split.y_path
            log.debug("validate: %s", path, exc_info=True)
            message = f"cannot be checked ({type(exc).__name__}: {exc})"
            return [*problems, split.problem("unreadable", path, message, REFETCH)], False
        problems += found
        if found and check.stops:
            return problems, False
    return problems, True


def summary(split: SplitFacts, complete: bool) -> dict[str, Any]:
    """The split's entry in the report: as much as the checks that ran learned."""
    entry: dict[str, Any] = {"x_file": str(split.x_path), "y_file": str(split.y_path)}
    if not split.both_open:
        return entry
    x, y = split.x, split.y
    entry.update(
        x_shape=list(x.shape), x_dtype=str(x.dtype), y_shape=list(y.shape), y_dtype=str(y.dtype)
    )
    if split.x_fits and split.y_fits:
        entry["n"] = split.n
    if complete and split.values is not None:
        entry.update(label_counts=split.label_counts, positive_fraction=split.positive_fraction)
    if complete and split.scan is not None:
        scan = split.scan
        entry.update(
            pixel_min=scan.minimum,
            pixel_max=scan.maximum,
            blank_count=scan.blank_count,
            blank_indices=scan.blank,
            duplicates_within=len(scan.duplicates),
        )
    return entry


@dataclass(frozen=True)
class SplitReport:
    summary: dict[str, Any]
    problems: list[Problem]
    hashes: np.ndarray | None  # of every patch, for the check across splits


def check_split(directory: Path, split: str, params: ValidateParams) -> SplitReport:
    """Check one split's two files."""
    with contextlib.ExitStack() as files:
        facts = SplitFacts(directory, split, params, files)
        problems, complete = run_checks(facts, params)
        hashes = facts.scan.hashes if complete and facts.scan is not None else None
        return SplitReport(summary(facts, complete), problems, hashes)


def leakage_problems(
    directory: Path, hashes: dict[str, np.ndarray], params: ValidateParams
) -> tuple[dict[tuple[str, str], list[int]], list[Problem]]:
    """Patches shared between splits, and the problems they make."""
    files = {split: split_files(directory, split)[0] for split in hashes}
    try:
        leakage = find_leakage(hashes, files)
    except UNEXPECTED as exc:  # every file read once already: changed while validate ran?
        log.debug("validate: leakage", exc_info=True)
        message = f"the cross-split check failed ({type(exc).__name__}: {exc})"
        fix = "do not rewrite the files while validate runs; re-run `pcam validate`"
        return {}, [Problem("error", "unreadable", str(directory), "all", message, fix)]
    problems = [
        Problem(
            "error" if params.fail_on_leakage else "warning",
            "leakage",
            str(files[later]),
            later,
            f"{len(indices)} patches also present in the {earlier} split (train/test leakage)",
            "remove them from one of the splits, or set validate.fail_on_leakage: false",
            indices[:MAX_LISTED],
        )
        for (earlier, later), indices in leakage.items()
    ]
    return leakage, problems


def validate_dir(directory: Path, params: ValidateParams) -> dict[str, Any]:
    """Every check of every split of the PCAM-format `directory`: the report validate writes."""
    splits, problems, hashes = {}, [], {}
    for split in SPLITS:
        report = check_split(directory, split, params)
        splits[split] = report.summary
        problems += report.problems
        if report.hashes is not None:
            hashes[split] = report.hashes
    leakage, shared = leakage_problems(directory, hashes, params)
    problems += shared
    return {
        "ok": not any(p.severity == "error" for p in problems),
        "splits": splits,
        "leakage": {f"{a}/{b}": len(ix) for (a, b), ix in leakage.items()},
        "problems": [asdict(p) for p in problems],
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
    }
