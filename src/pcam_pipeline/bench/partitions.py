"""The throughput table of benchmark jobs across partitions: `python -m
pcam_pipeline.bench.partitions REPORTS_DIR` reads every `benchmark-<partition>-<job>.json` that
slurm/benchmark.sbatch wrote there and writes `benchmark-partitions.md` beside them (partition,
node type, training img/s, job id). benchmark.sbatch runs it after each job, so the table always
holds every job's result (a course's thin_course and gpu_course side by side).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pcam_pipeline.repro import atomic_path

RESULT = re.compile(r"benchmark-(?P<partition>.+)-(?P<job>\d+)\.json")
TABLE_NAME = "benchmark-partitions.md"


def node_type(environment: dict[str, Any]) -> str:
    """The GPU's name where the run used one, else the CPU model and the cores it had."""
    if environment.get("gpu"):
        return str(environment["gpu"])
    cores = environment.get("cpus_usable") or environment.get("cpu_count")
    return f"{environment.get('cpu_model') or 'unknown CPU'}, {cores} cores"


def headline_throughput(result: dict[str, Any]) -> tuple[float, int] | None:
    """The headline series' best training img/s and the batch size it came at."""
    series = result.get("headline_series")
    runs = [
        (entry["train_img_s"], int(name.rsplit("_bs", 1)[1]))
        for name, entry in result.get("model", {}).items()
        if name.startswith(f"{series}_bs") and entry.get("train_img_s")
    ]
    return max(runs) if runs else None


def table_rows(reports: Path) -> list[list[str]]:
    rows = []
    for path in sorted(reports.glob("benchmark-*-*.json")):
        match = RESULT.fullmatch(path.name)
        if match is None:
            continue
        result = json.loads(path.read_text())
        best = headline_throughput(result)
        throughput = (
            f"{best[0]:,.0f} (batch {best[1]}, {result['headline_series']})" if best else "-"
        )
        node = node_type(result.get("environment", {}))
        rows.append([match["partition"], node, throughput, match["job"]])
    return rows


def write_table(reports: Path) -> Path:
    rows = table_rows(reports)
    lines = [
        "| partition | node type | train img/s | job id |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    target = reports / TABLE_NAME
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, help="the directory benchmark.sbatch writes to")
    print(write_table(parser.parse_args(argv).reports))


if __name__ == "__main__":
    main()
