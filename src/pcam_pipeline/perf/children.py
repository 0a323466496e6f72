"""One measured job in a fresh interpreter, so that each has its own peak memory:

    python -m pcam_pipeline.perf.children KIND SPEC

KIND is validate, preprocess or loader; SPEC is JSON: `params` (params.yaml as a mapping) and
the directories or file the job reads and writes. The result is printed as one JSON line after
CHILD_MARK. The parent calls `run_child`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from pcam_pipeline.bench.measure import evict, peak_rss_mb
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import Params, parse_params

CHILD_MARK = "PCAM-PERF-RESULT "


class PerfError(PipelineError):
    """A measurement cannot run as asked (no disk space, pipeline not cached, ...)."""


def validate_job(params: Params, spec: dict[str, Any]) -> dict[str, Any]:
    from pcam_pipeline.data.validation import validate_dir

    report = validate_dir(Path(spec["pcam_dir"]), params.validate_)
    return {"ok": report["ok"], "errors": report["errors"], "warnings": report["warnings"]}


def preprocess_job(params: Params, spec: dict[str, Any]) -> dict[str, Any]:
    from pcam_pipeline.data.prepare import write_processed
    from pcam_pipeline.data.processed import ProcessedData

    dataset = ProcessedData(Path(spec["out_dir"]))
    written = write_processed(dataset, Path(spec["pcam_dir"]), params.preprocess, params.validate_)
    return {"n_out": sum(split["n_out"] for split in written.report.values())}


def loader_job(params: Params, spec: dict[str, Any]) -> dict[str, Any]:
    from pcam_pipeline.bench.loaders import streaming_epoch

    options = params.loader.model_copy(update={"in_memory": False})
    return {"patches": streaming_epoch(Path(spec["path"]), options, params.train.batch_size, 0)}


JOBS: dict[str, Callable[[Params, dict[str, Any]], dict[str, Any]]] = {
    "validate": validate_job,
    "preprocess": preprocess_job,
    "loader": loader_job,
}
# What each job runs, imported before the memory it starts from is read. Each child loads only
# that (no torch for validate or preprocess, as in those stages): its memory is the job's.
JOB_MODULES = {
    "validate": "pcam_pipeline.data.validation",
    "preprocess": "pcam_pipeline.data.prepare",
    "loader": "pcam_pipeline.bench.loaders",
}


def measured(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job here: its seconds, peak memory and the memory it added, and its result."""
    params = parse_params(spec["params"], "perf child")
    importlib.import_module(JOB_MODULES[kind])
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    extra = JOBS[kind](params, spec)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "working_memory_mb": peak - (baseline / 2**20),  # both in MB
        **extra,
    }


def run_child(kind: str, spec: dict[str, Any], evict_first: Path | None = None) -> dict[str, Any]:
    """Run one measured job in a fresh interpreter; `evict_first`: drop that file from the page
    cache just before (the job then reads it cold)."""
    if evict_first is not None:
        evict(evict_first)
    result = subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.perf.children", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in result.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line.removeprefix(CHILD_MARK))
    raise PerfError(
        f"perf child '{kind}' failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    )


def main(argv: list[str]) -> int:
    kind, spec = argv
    print(CHILD_MARK + json.dumps(measured(kind, json.loads(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
