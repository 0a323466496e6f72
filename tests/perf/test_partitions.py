"""The partition throughput table (src/pcam_pipeline/perf/partitions.py) from benchmark results
named as slurm/benchmark.sbatch names them: a course's thin_course and gpu_course (a MIG slice)
side by side, with the batch where the slice overtakes the CPU partition."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.perf.partitions import (
    JSON_NAME,
    TABLE_NAME,
    build_table,
    load_results,
    main,
    write_table,
)
from tests.conftest import REPO_ROOT

SLICE = "NVIDIA A100-SXM4-40GB MIG 1g.5gb"


def result(series: str, throughputs: dict[int, float], **environment: object) -> dict:
    return {
        "headline_series": series,
        "model": {f"{series}_bs{bs}": {"train_img_s": v} for bs, v in throughputs.items()},
        "environment": environment,
    }


def write(reports: Path, name: str, data: dict) -> None:
    (reports / name).write_text(json.dumps(data))


def cpu(throughputs: dict[int, float]) -> dict:
    return result("cpu_fp32", throughputs, cpu_model="Xeon Platinum 8360Y", cpus_usable=8)


def gpu(throughputs: dict[int, float]) -> dict:
    return result("cuda_bf16", throughputs, gpu=SLICE, gpu_mig={"mig": True, "profile": "1g.5gb"})


def test_the_course_table_shows_batch_1_and_the_batch_where_the_slice_overtakes(tmp_path: Path):
    write(tmp_path, "benchmark-thin_course-101.json", cpu({1: 150.0, 32: 290.0, 128: 210.0}))
    write(tmp_path, "benchmark-gpu_course-102.json", gpu({1: 68.2, 32: 2100.0, 128: 7900.0}))
    (tmp_path / "benchmark-gpu_course-102").mkdir()  # the plots directory beside it
    (tmp_path / "benchmark.json").write_text("{}")  # the stage's own output: not a job's
    (tmp_path / "benchmark-thin_course-latest.json").write_text("{}")  # no job id: not a job's

    table = write_table(tmp_path)

    assert table == tmp_path / TABLE_NAME
    assert table.read_text().splitlines() == [
        "| partition | node type | train img/s, batch 1 "
        "| train img/s, batch 32 (GPU overtakes CPU) | job id |",
        "|---|---|---|---|---|",
        "| thin_course | Xeon Platinum 8360Y, 8 cores | 150 | 290 | 101 |",
        f"| gpu_course | {SLICE} | 68 | 2,100 | 102 |",
        "",
        "gpu_course overtakes thin_course at batch 32, the smallest batch measured where it does: "
        "2,100 against 290 training img/s.",
    ]
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert (data["metric"], data["crossover_batch"], data["compared_batch"]) == (
        "train_img_s",
        32,
        32,
    )
    assert [row["job_id"] for row in data["rows"]] == ["101", "102"]
    assert data["rows"][1] == {
        "partition": "gpu_course",
        "node_type": SLICE,
        "series": "cuda_bf16",
        "img_s_batch1": 68.2,
        "img_s_compared": 2100.0,
        "img_s": {"1": 68.2, "32": 2100.0, "128": 7900.0},
        "job_id": "102",
    }
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_slice_that_never_wins_is_compared_at_the_largest_batch_and_says_so(tmp_path: Path):
    write(tmp_path, "benchmark-thin_course-7.json", cpu({1: 9738.0, 32: 20000.0, 128: 30000.0}))
    write(tmp_path, "benchmark-gpu_course-8.json", gpu({1: 6804.0, 32: 15000.0, 128: 25000.0}))

    data = build_table(load_results(tmp_path))

    assert (data["crossover_batch"], data["compared_batch"]) == (None, 128)
    assert data["summary"] == (
        "gpu_course does not overtake thin_course at any batch measured ([1, 32, 128]): add larger "
        "batches to benchmark.batch_sizes."
    )


def test_a_slice_faster_at_batch_1_overtakes_there(tmp_path: Path):
    write(tmp_path, "benchmark-thin_course-7.json", cpu({1: 100.0, 64: 400.0}))
    write(tmp_path, "benchmark-thin_course-9.json", cpu({1: 120.0, 64: 380.0}))  # a rerun
    write(tmp_path, "benchmark-gpu_course-8.json", gpu({1: 130.0, 64: 5000.0}))

    data = build_table(load_results(tmp_path))

    assert data["crossover_batch"] == 1
    assert [row["partition"] for row in data["rows"]] == [
        "thin_course",
        "gpu_course",
        "thin_course",
    ]


def test_without_a_gpu_result_the_table_says_what_is_missing(tmp_path: Path):
    """The local test cluster's gpu_course job trains on the CPU (no CUDA there): two CPU rows."""
    write(tmp_path, "benchmark-thin_course-3.json", cpu({1: 100.0, 32: 200.0}))
    write(tmp_path, "benchmark-gpu_course-4.json", cpu({1: 90.0, 32: 210.0}))

    write_table(tmp_path)

    lines = (tmp_path / TABLE_NAME).read_text().splitlines()
    assert lines[0].endswith("| train img/s, batch 32 | job id |")
    assert lines[-1].startswith("No crossover: the table needs a GPU result beside the others")
    assert json.loads((tmp_path / JSON_NAME).read_text())["crossover_batch"] is None


def test_no_results_make_an_empty_table(tmp_path: Path):
    data = build_table(load_results(tmp_path))
    assert (data["rows"], data["compared_batch"]) == ([], None)
    assert data["summary"].startswith("No crossover: the table needs a GPU result")


def test_the_benchmark_stage_output_reads_as_a_job_result(tmp_path: Path):
    """reports/benchmark.json as the benchmark stage wrote it (this repository's own run)."""
    shutil.copy(REPO_ROOT / "reports" / "benchmark.json", tmp_path / "benchmark-ci-5.json")
    (record,) = load_results(tmp_path)
    assert record["partition"] == "ci" and not record["gpu"]
    assert 1 in record["img_s"] and all(v > 0 for v in record["img_s"].values())
    assert record["node_type"].endswith(" cores")


def test_a_damaged_result_names_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "benchmark-gpu_course-12.json").write_text('{"model": ')  # cut short

    with pytest.raises(PipelineError, match=r"benchmark-gpu_course-12\.json: not a benchmark"):
        load_results(tmp_path)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Fix: delete it or rerun that job" in err
    assert "Traceback" not in err
    assert not (tmp_path / TABLE_NAME).exists()
    (tmp_path / "benchmark-gpu_course-12.json").write_text("[]")
    with pytest.raises(PipelineError, match=r"-12\.json: not a benchmark result \(not a JSON obj"):
        load_results(tmp_path)
    assert main([str(tmp_path / "missing")]) == 1
    assert "missing: no such directory. Fix:" in capsys.readouterr().err


def test_main_writes_both_files_and_prints_the_table_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    write(tmp_path, "benchmark-thin_course-1.json", cpu({1: 100.0}))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / TABLE_NAME)
    assert (tmp_path / JSON_NAME).exists()
