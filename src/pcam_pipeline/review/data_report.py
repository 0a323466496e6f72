"""`pcam data-report BASE`: what a data change did to the dataset, for the pull request that
makes it (.github/workflows/data.yml): the data params that changed, whether the pinned data
(data.dvc, data/pcam.md5) changed, and the validate and preprocess reports of BASE beside the
workspace's, split by split. Both reports are small JSON files git tracks, so BASE needs no DVC
cache; the channel statistics of the processed data are the workspace's (BASE's are in the
cache, which CI does not have)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.paths import PREPROCESS_REPORT, PROCESSED_DIR, VALIDATE_REPORT
from pcam_pipeline.repro import atomic_path
from pcam_pipeline.review.report import COMPARE_DIR, markdown_table, run_dvc

DATA_REPORT = "data.md"
DATA_PINS = ("data.dvc", "data/pcam.md5")
DATA_SECTIONS = ("cpu", "fetch", "validate", "preprocess")  # the params fetch..preprocess read
SPLITS = ("train", "valid", "test")
VALIDATE_FIELDS = (
    "n",
    "positive_fraction",
    "blank_count",
    "duplicates_within",
    "pixel_min",
    "pixel_max",
)
PREPROCESS_FIELDS = ("n_in", "n_out", "blank_removed", "clipped")

GitRunner = Callable[[list[str]], subprocess.CompletedProcess]


def run_git(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def json_at(rev: str, path: Path, git: GitRunner) -> dict[str, Any] | None:
    """A JSON file as committed at `rev`; None when it is not there."""
    shown = git(["show", f"{rev}:{path.as_posix()}"])
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def changed_pins(base: str, git: GitRunner) -> list[str]:
    verified = git(["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"])
    if verified.returncode != 0:
        raise PipelineError(f"{base}: not a revision here; fetch it (git fetch) or name another")
    diff = git(["diff", "--name-only", base, "--", *DATA_PINS])
    return [line for line in diff.stdout.splitlines() if line]


def data_params_rows(params_diff: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, change in sorted(params_diff.get("params.yaml", {}).items()):
        if key.split(".", 1)[0] in DATA_SECTIONS:
            rows.append([key, repr(change.get("old")), repr(change.get("new"))])
    return rows


def shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def split_rows(
    before: dict[str, Any] | None, after: dict[str, Any], fields: tuple[str, ...]
) -> list[list[str]]:
    """split.field | base | workspace, for each field either side has; changed ones marked."""
    rows = []
    for split in SPLITS:
        old, new = per_split(before).get(split, {}), per_split(after).get(split, {})
        for field in fields:
            a, b = shown(old.get(field)), shown(new.get(field))
            rows.append([f"{split}.{field}", a, b if a == b else f"**{b}**"])
    return rows


def per_split(report: dict[str, Any] | None) -> dict[str, Any]:
    """validate.json keeps its splits under "splits", preprocess.json at the top."""
    return (report or {}).get("splits", report or {})


def build_data_report(
    base: str,
    out_dir: Path = COMPARE_DIR,
    dvc: Callable[[list[str]], str] = run_dvc,
    git: GitRunner = run_git,
) -> Path:
    """Write out_dir/data.md from the workspace's reports (run `dvc repro preprocess` first)."""
    missing = [str(p) for p in (VALIDATE_REPORT, PREPROCESS_REPORT) if not p.is_file()]
    if missing:
        raise PipelineError(f"{', '.join(missing)}: not found; run `dvc repro preprocess` first")
    validate = json.loads(VALIDATE_REPORT.read_text())
    preprocess = json.loads(PREPROCESS_REPORT.read_text())
    pins = changed_pins(base, git)
    params = data_params_rows(json.loads(dvc(["params", "diff", base, "--json"]) or "{}"))
    problems = validate.get("problems") or []
    sections = [
        f"# The data: workspace against {base}",
        f"Pinned data files changed: {', '.join(f'`{p}`' for p in pins) if pins else 'none'}.",
        "## Data params",
        markdown_table(["param", base, "workspace"], params)
        if params
        else "No data params changed.",
        f"## Validate ({VALIDATE_REPORT})",
        f"{'passed' if validate.get('ok') else '**failed**'}: {validate.get('errors', 0)} errors"
        + "".join(f"\n- {shown_problem(p)}" for p in problems),
        markdown_table(
            ["split.field", base, "workspace"],
            split_rows(json_at(base, VALIDATE_REPORT, git), validate, VALIDATE_FIELDS),
        ),
        f"## Preprocess ({PREPROCESS_REPORT})",
        markdown_table(
            ["split.field", base, "workspace"],
            split_rows(json_at(base, PREPROCESS_REPORT, git), preprocess, PREPROCESS_FIELDS),
        ),
    ]
    from pcam_pipeline.data.processed import ProcessedData

    stats = ProcessedData(PROCESSED_DIR).stats_path
    if stats.is_file():
        channels = json.loads(stats.read_text())
        sections += [
            f"## Channel statistics of the processed train split ({stats}, workspace)",
            markdown_table(
                ["", "R", "G", "B"],
                [
                    [key, *(f"{v:.4f}" for v in channels[key])]
                    for key in ("mean", "std")
                    if key in channels
                ],
            ),
        ]
    report = out_dir / DATA_REPORT
    report.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(report) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    return report


def shown_problem(problem: Any) -> str:
    if isinstance(problem, dict):
        return "; ".join(f"{k}: {v}" for k, v in problem.items())
    return str(problem)


def main(base: str, out_dir: Path | None) -> None:
    print(build_data_report(base, out_dir or COMPARE_DIR))
