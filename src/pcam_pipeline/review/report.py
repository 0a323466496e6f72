"""`pcam report [BASE]`: the workspace (or a revision) against a base revision, offline.

Params diff, metrics diff (the test metrics beside the majority-class baseline evaluate writes
next to them) and every plot of dvc.yaml rendered to PNG or SVG by vl-convert from
`dvc plots diff --json`: no browser, no CDN, so it works on a compute node and in CI. The same
Markdown is what a pull request's comment shows and what a student pastes into a journal.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments.dvc import run
from pcam_pipeline.paths import METRICS_FILE
from pcam_pipeline.repro import atomic_path

COMPARE_DIR = Path("reports/compare")
REPORT_NAME = "report.md"
IMAGE_FORMATS = ("png", "svg")
# evaluate writes the majority-class baseline's scores under this key, the model's under "test"
BASELINE_KEY, MODEL_KEY = "baseline", "test"

DvcRunner = Callable[[Sequence[str]], str]


@dataclass(frozen=True)
class Comparison:
    base: str
    rev: str | None  # None: the workspace

    @property
    def revisions(self) -> list[str]:
        return [self.base] if self.rev is None else [self.base, self.rev]

    @property
    def new_label(self) -> str:
        return self.rev or "workspace"


def run_dvc(args: Sequence[str]) -> str:
    """One dvc command's stdout, run here; its failure becomes a message that names the command."""
    fix = "check that the revision exists (git log) and that dvc.yaml is valid"
    return run(["dvc", *args], Path.cwd(), fix).stdout


def slug(name: str) -> str:
    """A file name for a plot's title or path: 'AUROC and accuracy' -> 'auroc-and-accuracy'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "plot"


def baseline_rows(metrics_diff: dict[str, Any]) -> list[list[str]]:
    """Per metric the baseline has: the model at base and now, and the majority baseline now
    (`metrics_diff`: `dvc metrics diff --all --json`, so unchanged metrics are in it too)."""
    entries = metrics_diff.get(str(METRICS_FILE), {})

    def value(key: str, side: str) -> str:
        found = entries.get(key, {}).get(side)
        return "-" if found is None else f"{found:.5g}"

    prefix = f"{BASELINE_KEY}."
    names = sorted(
        key.removeprefix(prefix)
        for key in entries
        if key.startswith(prefix) and f"{MODEL_KEY}.{key.removeprefix(prefix)}" in entries
    )
    return [
        [
            name,
            value(f"{MODEL_KEY}.{name}", "old"),
            value(f"{MODEL_KEY}.{name}", "new"),
            value(f"{BASELINE_KEY}.{name}", "new"),
        ]
        for name in names
    ]


def has_rows(table: str) -> bool:
    """Whether a Markdown table from dvc has rows below its header and rule (an empty diff
    prints the header alone)."""
    return len(table.splitlines()) > 2


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_vega(spec: dict[str, Any], target: Path) -> None:
    """One Vega-Lite spec to PNG or SVG (by `target`'s suffix), with vl-convert's bundled Vega."""
    try:
        import vl_convert
    except ImportError as exc:
        raise PipelineError(
            "rendering plots needs vl-convert-python (the dev extra): run `make setup`"
        ) from exc

    if target.suffix == ".svg":
        target.write_text(vl_convert.vegalite_to_svg(spec))
    else:
        target.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))


def render_plots(
    plots: dict[str, list[dict[str, Any]]], scratch: Path, images: Path, image_format: str
) -> list[tuple[str, list[str]]]:
    """Each plot's title and the image files written for it (relative to `images`' parent):
    one rendering per Vega plot, the image files themselves for image plots (one per revision)."""
    images.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entries in plots.items():
        files = []
        for entry in entries:
            if entry["type"] == "vega":
                target = images / f"{slug(name)}.{image_format}"
                render_vega(entry["content"], target)
            elif entry["type"] == "image":
                source = Path(entry["url"])
                source = source if source.is_absolute() else scratch / source
                revision = slug("-".join(entry.get("revisions", [])))
                target = images / f"{slug(name)}-{revision}{source.suffix}"
                shutil.copyfile(source, target)
            else:
                continue
            files.append(f"{images.name}/{target.name}")
        written.append((name, files))
    return written


def build_report(
    comparison: Comparison,
    out_dir: Path = COMPARE_DIR,
    image_format: str = "png",
    dvc: DvcRunner = run_dvc,
) -> Path:
    """Write out_dir/report.md and out_dir/images/; return the report's path."""
    if image_format not in IMAGE_FORMATS:
        raise PipelineError(f"--format {image_format!r}: use one of {', '.join(IMAGE_FORMATS)}")
    revs = comparison.revisions
    params_md = dvc(["params", "diff", *revs, "--md"]).strip()
    metrics_md = dvc(["metrics", "diff", *revs, "--md"]).strip()
    metrics_all = json.loads(dvc(["metrics", "diff", *revs, "--all", "--json"]) or "{}")
    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)  # no image of an earlier comparison stays behind
    with tempfile.TemporaryDirectory(prefix="pcam-report-") as scratch:
        plots = json.loads(dvc(["plots", "diff", *revs, "--json", "-o", scratch]) or "{}")
        rendered = render_plots(plots.get("data", {}), Path(scratch), images, image_format)
    sections = [
        f"# {comparison.new_label} against {comparison.base}",
        "## Params",
        params_md if has_rows(params_md) else "No params changed.",
        "## Metrics",
        metrics_md if has_rows(metrics_md) else "No metrics changed.",
        f"## Test metrics beside the majority-class baseline ({METRICS_FILE})",
        markdown_table(
            ["metric", comparison.base, comparison.new_label, "majority baseline"],
            baseline_rows(metrics_all),
        ),
        "## Plots",
    ]
    for name, files in rendered:
        sections.append(f"### {name}")
        sections += [f"![{name}]({file})" for file in files] or ["(no data in either revision)"]
    report = out_dir / REPORT_NAME
    with atomic_path(report) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    return report


def main(base: str, rev: str | None, out_dir: Path | None, image_format: str) -> None:
    report = build_report(Comparison(base=base, rev=rev), out_dir or COMPARE_DIR, image_format)
    print(report)
