"""The partition throughput table (src/pcam_pipeline/bench/partitions.py) from benchmark results
named as slurm/benchmark.sbatch names them."""

from __future__ import annotations

import json
from pathlib import Path

from pcam_pipeline.bench.partitions import TABLE_NAME, write_table


def result(series: str, throughputs: dict[int, float], **environment: object) -> dict:
    return {
        "headline_series": series,
        "model": {f"{series}_bs{bs}": {"train_img_s": v} for bs, v in throughputs.items()},
        "environment": environment,
    }


def test_one_row_per_job_with_the_node_and_the_best_batch(tmp_path: Path):
    cpu = result("cpu_fp32", {1: 50.0, 128: 140.0}, cpu_model="Xeon Platinum 8360Y", cpus_usable=8)
    gpu = result("cuda_bf16", {1024: 54320.4, 64: 14096.0}, gpu="NVIDIA A100-SXM4-40GB")
    (tmp_path / "benchmark-thin_course-101.json").write_text(json.dumps(cpu))
    (tmp_path / "benchmark-gpu_course-102.json").write_text(json.dumps(gpu))
    (tmp_path / "benchmark-gpu_course-102").mkdir()  # the plots directory beside it
    (tmp_path / "benchmark.json").write_text("{}")  # the stage's own output: not a job's

    table = write_table(tmp_path)

    assert table == tmp_path / TABLE_NAME
    assert table.read_text().splitlines() == [
        "| partition | node type | train img/s | job id |",
        "|---|---|---|---|",
        "| gpu_course | NVIDIA A100-SXM4-40GB | 54,320 (batch 1024, cuda_bf16) | 102 |",
        "| thin_course | Xeon Platinum 8360Y, 8 cores | 140 (batch 128, cpu_fp32) | 101 |",
    ]
