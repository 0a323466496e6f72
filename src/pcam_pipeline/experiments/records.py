"""DVC's own record of experiments (`dvc exp show --json`), read into flat params and metrics.

Pure: the JSON in, records out, so experiments run anywhere (a Slurm job, another machine, pulled
from the remote) read the same way as those run here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcam_pipeline.experiments.dvc import command

PARAMS_FILE_KEY = "params.yaml"
SEED_PARAM = "train.seed"
# Which metrics are measured on which split: the validation split chooses, the test split
# only reports (a search may never optimise a test metric).
VALIDATION_PREFIXES = ("valid.", "val_")
TEST_PREFIXES = ("test.",)


@dataclass(frozen=True)
class ExperimentRecord:
    name: str
    rev: str
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    metrics: dict[str, float]  # every metrics file, flattened to dotted keys

    @property
    def seed(self) -> Any:
        return self.params.get(SEED_PARAM)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def is_validation_metric(name: str) -> bool:
    return name.startswith(VALIDATION_PREFIXES)


def is_test_metric(name: str) -> bool:
    return name.startswith(TEST_PREFIXES)


def _numeric_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for file_record in (data.get("metrics") or {}).values():
        for key, value in flatten(file_record.get("data") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key] = float(value)
    return metrics


def _record(revision: Mapping[str, Any], name: str | None) -> ExperimentRecord | None:
    data = revision.get("data") or {}
    params = ((data.get("params") or {}).get(PARAMS_FILE_KEY) or {}).get("data")
    if not params or revision.get("error"):
        return None  # a failed or queued experiment: nothing measured
    return ExperimentRecord(
        name=name or revision.get("name") or str(revision.get("rev", ""))[:7],
        rev=str(revision.get("rev", "")),
        params=flatten(params),
        metrics=_numeric_metrics(data),
    )


def parse_exp_show(rows: Iterable[Mapping[str, Any]]) -> list[ExperimentRecord]:
    """The experiments of every baseline in `dvc exp show --json` output (not the workspace nor
    the baseline commits themselves: those are what the experiments vary), once each."""
    records: dict[str, ExperimentRecord] = {}
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        for experiment in row.get("experiments") or []:
            revisions = experiment.get("revs") or []
            if not revisions:
                continue
            record = _record(revisions[0], experiment.get("name"))
            if record is not None:
                records.setdefault(record.rev, record)
    return list(records.values())


def read_experiments(repo: Path, all_commits: bool = False) -> list[ExperimentRecord]:
    """Run `dvc exp show --json` in `repo` and parse it."""
    args = ["dvc", "exp", "show", "--json", "--no-fetch", *(["-A"] if all_commits else [])]
    return parse_exp_show(json.loads(command(args, repo) or "[]"))
