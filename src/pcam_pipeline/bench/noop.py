"""A no-op `dvc repro` (everything cached) against `dvc status`: what DVC itself costs per
command (`python -m pcam_pipeline.bench.perf noop`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pcam_pipeline.bench.children import PerfError
from pcam_pipeline.bench.measure import median


def dvc(repo: Path, *args: str) -> tuple[float, str]:
    """Seconds and output of `dvc ARGS` in `repo`; PerfError if it fails."""
    executable = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [executable, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise PerfError(
            f"`dvc {' '.join(args)}` failed in {repo} ({result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return seconds, result.stdout + result.stderr


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
