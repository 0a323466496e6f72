"""A no-op `dvc repro` (everything cached) against `dvc status`: what DVC itself costs per
command (`python -m pcam_pipeline.perf noop`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pcam_pipeline.bench.measure import median
from pcam_pipeline.experiments.dvc import run
from pcam_pipeline.perf.children import PerfError


def dvc(repo: Path, *args: str) -> tuple[float, str]:
    """Seconds and output of `dvc ARGS` in `repo`; a PipelineError if it fails."""
    start = time.perf_counter()
    result = run(["dvc", *args], repo)
    return time.perf_counter() - start, result.stdout + result.stderr


def noop_ratio(repo: Path, repeats: int = 11) -> dict[str, Any]:
    """Median seconds of `dvc repro` with everything cached, over those of `dvc status`."""
    _, dry = dvc(repo, "repro", "--dry")
    if "Running stage" in dry:
        raise PerfError(
            f"{repo}: `dvc repro` would run stages, so it is not a no-op; run `dvc repro` "
            f"there first:\n{dry[-2000:]}"
        )
    dvc(repo, "status")  # warm-up: imports, file system caches
    dvc(repo, "repro")
    status_s, repro_s = [], []
    for _ in range(repeats):
        seconds, _ = dvc(repo, "status")
        status_s.append(seconds)
        seconds, output = dvc(repo, "repro")
        if "Running stage" in output:
            raise PerfError(f"{repo}: `dvc repro` ran a stage, not a no-op:\n{output[-2000:]}")
        repro_s.append(seconds)
    ratio = median(repro_s) / median(status_s)
    return {
        "dvc_status_s": median(status_s),
        "dvc_repro_noop_s": median(repro_s),
        "ratio": ratio,
        "repeats": repeats,
        "target_at_most_1_5x": ratio <= 1.5,
        "status_samples_s": status_s,
        "repro_samples_s": repro_s,
    }
