"""The throughput table of benchmark jobs across partitions: `python -m
pcam_pipeline.perf.partitions REPORTS_DIR` reads every `benchmark-<partition>-<job>.json` that
slurm/benchmark.sbatch wrote there and writes `benchmark-partitions.md` and
`benchmark-partitions.json` beside them: partition, node type, training img/s at batch 1 and at the
batch where a GPU (a course's MIG slice) overtakes the CPU partitions, job id. benchmark.sbatch
runs it after each job, so the table always holds every job's result (a course's thin_course and
gpu_course side by side).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.repro import atomic_path, write_json

RESULT = re.compile(r"benchmark-(?P<partition>.+)-(?P<job>\d+)\.json")
TABLE_NAME = "benchmark-partitions.md"
JSON_NAME = "benchmark-partitions.json"
FIX = (
    "Fix: delete it or rerun that job (slurm/submit.sh -p PARTITION benchmark), then "
    "`python -m pcam_pipeline.perf.partitions reports`."
)
METRIC = "train_img_s"  # the headline series' training throughput, as the benchmark stage reports


def node_type(environment: dict[str, Any]) -> str:
    """The GPU's name where the run used one, else the CPU model and the cores it had."""
    if environment.get("gpu"):
        return str(environment["gpu"])
    cores = environment.get("cpus_usable") or environment.get("cpu_count")
    return f"{environment.get('cpu_model') or 'unknown CPU'}, {cores} cores"


def series_throughput(result: dict[str, Any]) -> dict[int, float]:
    """Batch size -> training img/s of the result's headline series."""
    series = result.get("headline_series")
    return {
        int(name.rsplit("_bs", 1)[1]): float(entry[METRIC])
        for name, entry in result.get("model", {}).items()
        if name.startswith(f"{series}_bs") and entry.get(METRIC)
    }


def load_results(reports: Path) -> list[dict[str, Any]]:
    """One record per job result in REPORTS (partition, job, node, GPU or not, img/s by batch),
    in job order."""
    if not reports.is_dir():
        raise PipelineError(
            f"{reports}: no such directory. Fix: give the reports directory the benchmark jobs "
            "wrote to (reports/ of the repository they were submitted from)."
        )
    records = []
    for path in reports.glob("benchmark-*-*.json"):
        match = RESULT.fullmatch(path.name)
        if match is None:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path}: not a benchmark result ({exc}). {FIX}") from exc
        if not isinstance(result, dict):
            raise PipelineError(f"{path}: not a benchmark result (not a JSON object). {FIX}")
        environment = result.get("environment") or {}
        records.append(
            {
                "partition": match["partition"],
                "job_id": match["job"],
                "node_type": node_type(environment),
                "gpu": bool(environment.get("gpu")),
                "series": result.get("headline_series"),
                "img_s": series_throughput(result),
            }
        )
    return sorted(records, key=lambda record: int(record["job_id"]))


def crossover_batch(records: list[dict[str, Any]]) -> int | None:
    """The smallest batch size at which a GPU result trains faster than every CPU result
    measured at that batch; None without both kinds, or where the GPU never wins."""
    cpu = [r["img_s"] for r in records if not r["gpu"]]
    gpu = [r["img_s"] for r in records if r["gpu"]]
    if not (cpu and gpu):
        return None
    batches = sorted({b for g in gpu for b in g} & {b for c in cpu for b in c})
    for batch in batches:
        best_cpu = max(c[batch] for c in cpu if batch in c)
        if any(g.get(batch, 0.0) > best_cpu for g in gpu):
            return batch
    return None


def comparison_batch(records: list[dict[str, Any]], crossover: int | None) -> int | None:
    """The batch of the table's second column: the crossover, else the largest batch every
    result measured (where a GPU comes closest, for lack of a crossover)."""
    if crossover is not None:
        return crossover
    common = set.intersection(*(set(r["img_s"]) for r in records)) if records else set()
    return max(common) if common else None


def summary(records: list[dict[str, Any]], crossover: int | None) -> str:
    """One sentence under the table: where the GPU pays off, or why the table cannot say."""
    kinds = {r["gpu"] for r in records}
    if kinds != {True, False}:
        missing = "GPU" if True not in kinds else "CPU-partition"
        return (
            f"No crossover: the table needs a {missing} result beside the others (a benchmark job "
            "that ran on the CPU, e.g. with PCAM_REQUIRE_CUDA=0, counts as a CPU result)."
        )
    gpus = ", ".join(sorted({r["partition"] for r in records if r["gpu"]}))
    cpus = ", ".join(sorted({r["partition"] for r in records if not r["gpu"]}))
    if crossover is None:
        measured = sorted({b for r in records for b in r["img_s"]})
        return (
            f"{gpus} does not overtake {cpus} at any batch measured ({measured}): add larger "
            "batches to benchmark.batch_sizes."
        )
    gpu_best = max(r["img_s"].get(crossover, 0.0) for r in records if r["gpu"])
    cpu_best = max(r["img_s"].get(crossover, 0.0) for r in records if not r["gpu"])
    return (
        f"{gpus} overtakes {cpus} at batch {crossover}, the smallest batch measured where it "
        f"does: {gpu_best:,.0f} against {cpu_best:,.0f} training img/s."
    )


def figure(img_s: float | None) -> str:
    return "-" if img_s is None else f"{img_s:,.0f}"


def build_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The table as data: its rows, the crossover batch and the sentence that goes with it."""
    crossover = crossover_batch(records)
    compared = comparison_batch(records, crossover)
    rows = [
        {
            "partition": r["partition"],
            "node_type": r["node_type"],
            "series": r["series"],
            "img_s_batch1": r["img_s"].get(1),
            "img_s_compared": r["img_s"].get(compared) if compared is not None else None,
            "img_s": {str(batch): img_s for batch, img_s in sorted(r["img_s"].items())},
            "job_id": r["job_id"],
        }
        for r in records
    ]
    return {
        "metric": METRIC,
        "crossover_batch": crossover,
        "compared_batch": compared,
        "summary": summary(records, crossover),
        "rows": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    compared = table["compared_batch"]
    column = f"train img/s, batch {compared if compared is not None else '-'}"
    if table["crossover_batch"] is not None:
        column += " (GPU overtakes CPU)"
    lines = [
        f"| partition | node type | train img/s, batch 1 | {column} | job id |",
        "|---|---|---|---|---|",
        *(
            f"| {r['partition']} | {r['node_type']} | {figure(r['img_s_batch1'])} | "
            f"{figure(r['img_s_compared'])} | {r['job_id']} |"
            for r in table["rows"]
        ),
        "",
        table["summary"],
    ]
    return "\n".join(lines) + "\n"


def write_table(reports: Path) -> Path:
    """benchmark-partitions.md and .json in REPORTS; returns the markdown's path."""
    table = build_table(load_results(reports))
    target = reports / TABLE_NAME
    with atomic_path(target) as tmp:
        tmp.write_text(markdown(table))
    write_json(reports / JSON_NAME, table)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, help="the directory benchmark.sbatch writes to")
    try:
        print(write_table(parser.parse_args(argv).reports))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
