"""Experiments grouped by their params minus the seed: mean, std and 95% interval per metric.

`group_by_params` and `summarize` are pure (records in, groups out); `main` reads DVC's records,
prints the table and writes reports/summary.json and reports/summary.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcam_pipeline.experiments.records import (
    SEED_PARAM,
    ExperimentRecord,
    is_test_metric,
    is_validation_metric,
    read_experiments,
)
from pcam_pipeline.experiments.stats import Spread, spread
from pcam_pipeline.repro import atomic_path, write_json

SUMMARY_JSON = Path("reports/summary.json")
SUMMARY_MARKDOWN = Path("reports/summary.md")
# The columns of the printed table; every validation and test metric is in the JSON.
TABLE_METRICS = ("valid.auroc", "test.auroc", "test.accuracy", "test.nll")


@dataclass(frozen=True)
class Group:
    params: dict[str, Any]  # every param except the seed
    experiments: list[ExperimentRecord]
    metrics: dict[str, Spread]

    @property
    def seeds(self) -> list[Any]:
        return [record.seed for record in self.experiments]


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in params.items() if k != SEED_PARAM}, sort_keys=True)


def group_by_params(records: Iterable[ExperimentRecord]) -> list[list[ExperimentRecord]]:
    """Records with equal params apart from the seed, in order of first appearance."""
    groups: dict[str, list[ExperimentRecord]] = {}
    for record in records:
        groups.setdefault(_params_key(record.params), []).append(record)
    return list(groups.values())


def summarize(records: Iterable[ExperimentRecord]) -> list[Group]:
    """One Group per params set: the spread of every validation and test metric over its runs."""
    summary = []
    for members in group_by_params(records):
        names = sorted(
            {m for r in members for m in r.metrics if is_validation_metric(m) or is_test_metric(m)}
        )
        metrics = {
            name: spread([r.metrics[name] for r in members if name in r.metrics]) for name in names
        }
        params = {k: v for k, v in members[0].params.items() if k != SEED_PARAM}
        summary.append(Group(params, members, metrics))
    return summary


def varying_params(groups: Sequence[Group]) -> list[str]:
    """The params whose value differs between groups: what tells the groups apart."""
    keys = sorted({k for g in groups for k in g.params})
    return [k for k in keys if len({json.dumps(g.params.get(k)) for g in groups}) > 1]


def summary_json(groups: Sequence[Group]) -> dict[str, Any]:
    return {
        "seed_param": SEED_PARAM,
        "varying_params": varying_params(groups),
        "groups": [
            {
                "params": {k: g.params.get(k) for k in varying_params(groups)},
                "experiments": [r.name for r in g.experiments],
                "seeds": g.seeds,
                "metrics": {name: s.as_dict() for name, s in g.metrics.items()},
            }
            for g in groups
        ],
    }


def table_rows(groups: Sequence[Group], metrics: Sequence[str] = TABLE_METRICS) -> list[list[str]]:
    """Header and one row per group: the varying params, the runs, each metric's mean ± std."""
    varying = varying_params(groups)
    header = [*varying, "runs", *metrics]
    rows = [header]
    for g in groups:
        cells = [str(g.params.get(k)) for k in varying] + [str(len(g.experiments))]
        cells += [g.metrics[m].text() if m in g.metrics else "-" for m in metrics]
        rows.append(cells)
    return rows


def render_text(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


def render_markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def interval_note(groups: Sequence[Group], metric: str) -> str:
    """One line per group with the 95% interval of `metric` (the table shows mean ± std)."""
    lines = []
    for number, g in enumerate(groups, 1):
        s = g.metrics.get(metric)
        if s is not None and s.ci95 is not None:
            lines.append(
                f"group {number}: {metric} 95% interval [{s.ci95[0]:.4f}, {s.ci95[1]:.4f}] "
                f"(t, {s.n - 1} df)"
            )
    return "\n".join(lines) + ("\n" if lines else "")


def main(repo: Path = Path("."), all_commits: bool = False) -> list[Group]:
    groups = summarize(read_experiments(repo, all_commits))
    if not groups:
        print("no experiments in `dvc exp show`: run some (`pcam seeds 3`) or pull them first")
        return groups
    rows = table_rows(groups)
    print(render_text(rows) + interval_note(groups, TABLE_METRICS[0]), end="")
    write_json(repo / SUMMARY_JSON, summary_json(groups))
    with atomic_path(repo / SUMMARY_MARKDOWN) as tmp:
        tmp.write_text(render_markdown(rows) + "\n" + interval_note(groups, TABLE_METRICS[0]))
    print(f"wrote {SUMMARY_JSON} and {SUMMARY_MARKDOWN}")
    return groups
