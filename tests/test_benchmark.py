"""The benchmark stage and the perf measurements, on a tiny processed dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from pcam_pipeline import perf
from pcam_pipeline.data.hdf5 import ProcessedLayout, ProcessedWriter
from pcam_pipeline.params import Params
from pcam_pipeline.stages import benchmark
from tests.conftest import REPO_ROOT

TRAIN = 128


def write_dataset(directory: Path, n: int = TRAIN) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
    with ProcessedWriter(directory / "train.h5", ProcessedLayout(32, "none")) as writer:
        writer.append(x, (np.arange(n) % 2).astype(np.uint8), np.arange(n))
    (directory / "stats.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3}))
    return directory


BENCHMARK = {
    "batch_sizes": [1, 8],
    "devices": ["cpu", "cuda"],
    "precisions": ["fp32"],
    "warmup_iters": 1,
    "timed_iters": 2,
    "latency_iters": 3,
    "loader_patches": 300,
    "baseline_patches": 16,
    "full": False,
}


@pytest.fixture
def params(make_params) -> Params:
    return make_params(
        benchmark=BENCHMARK,
        loader={"block_patches": 64},
        train={"batch_size": 16, "cnn": {"channels": [4, 8]}, "device": "cpu"},
    )


@pytest.fixture
def project(in_tmp_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = write_dataset(in_tmp_project / "data" / "processed")
    monkeypatch.setenv("PCAM_TRAIN_DATA_DIR", str(data))
    tmp = in_tmp_project / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return in_tmp_project


def test_stage_writes_metrics_and_plots(project, params, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu-short")
    benchmark.main(params)
    metrics = json.loads(Path("reports/benchmark.json").read_text())
    loader = metrics["loader"]
    for key in (
        "ours_in_memory_img_s",
        "ours_streaming_img_s",
        "per_sample_baseline_img_s",
        "raw_read_img_s",
        "raw_h5py_img_s",
        "raw_pread_img_s",
        "in_memory_load_img_s",
        "normalise_cpu_img_s",
        "normalise_augment_cpu_img_s",
        "speedup_in_memory_vs_baseline",
        "speedup_streaming_vs_baseline",
        "streaming_fraction_of_raw",
        "in_memory_fraction_of_raw",
    ):
        assert isinstance(loader[key], float) and loader[key] > 0, key
    assert loader["patches"] == 300 and loader["distinct_patches"] == TRAIN, "tiled to size"
    assert loader["baseline_patches"] == 16 and loader["batch_size"] == 16
    for key in ("cpu_fp32_bs1", "cpu_fp32_bs8"):
        row = metrics["model"][key]
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["rss_mb"] > 0
    latency = metrics["latency_batch1"]["cpu_fp32"]
    assert 0 < latency["p50_ms"] <= latency["p95_ms"]
    assert metrics["memory"]["peak_rss_mb"] > 0
    env = metrics["environment"]
    assert env["slurm_job_id"] == "4242" and env["slurm_job_partition"] == "gpu-short"
    assert env["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert set(metrics["targets"]) == {
        "loader_patches_at_least_20000",
        "loader_speedup_vs_baseline_at_least_20x",
        "streaming_at_least_half_of_raw_read",
    }
    assert metrics["targets"]["loader_patches_at_least_20000"] is False
    if not torch.cuda.is_available():
        assert any("CUDA path not measured" in s for s in metrics["skipped"])
    assert metrics["errors"] == {}
    throughput = json.loads(Path("reports/benchmark/throughput.json").read_text())
    assert [r["batch_size"] for r in throughput] == [1, 8]
    assert all(r["series"] == metrics["headline_series"] == "cpu_fp32" for r in throughput)
    designs = {r["design"] for r in json.loads(Path("reports/benchmark/loader.json").read_text())}
    assert {"ours, in memory", "ours, streaming", "per-sample baseline"} <= designs
    assert not list(Path("tmp").glob("pcam-benchmark-*")), "the tiled file is removed"


def test_out_of_memory_is_a_result_not_a_crash(project, params, monkeypatch):
    real = benchmark.normalise

    def normalise(x, *args, **kwargs):
        if x.shape[0] >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(benchmark, "normalise", normalise)
    monkeypatch.setattr(
        benchmark,
        "time_loader_designs",
        lambda *_: {
            "patches": 1,
            "ours_streaming_img_s": 1.0,
            "speedup_streaming_vs_baseline": 1.0,
            "streaming_fraction_of_raw": 1.0,
            "per_sample_baseline_img_s": 1.0,
            "raw_read_img_s": 1.0,
        },
    )
    results = benchmark.run(params)
    rows = {r["batch_size"]: r for r in results["models"]["rows"]}
    assert rows[8]["oom"] == 1 and "out of memory" in rows[8]["error"]
    assert "train_img_s" not in rows[8]
    assert rows[1]["train_img_s"] > 0, "the batch sizes that fit are still measured"
    benchmark.write_reports(results)
    metrics = json.loads(Path("reports/benchmark.json").read_text())
    assert metrics["model"]["cpu_fp32_bs8"] == {"oom": 1}
    assert "out of memory" in metrics["errors"]["cpu_fp32_bs8"]


def test_other_errors_are_not_swallowed(params, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(benchmark, "normalise", broken)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(RuntimeError, match="shapes"):
        benchmark.time_model(model, torch.device("cpu"), "fp32", 2, params.benchmark)
    assert benchmark.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not benchmark.is_out_of_memory(ValueError("out of memory"))


def test_benchmark_file_keeps_the_layout(tmp_path):
    source = write_dataset(tmp_path / "d") / "train.h5"
    path, distinct = benchmark.benchmark_file(source, 200, tmp_path)
    with h5py.File(path, "r") as handle, h5py.File(source, "r") as original:
        assert handle["x"].shape == (200, 96, 96, 3) and distinct == TRAIN
        assert handle["x"].chunks == original["x"].chunks
        np.testing.assert_array_equal(handle["x"][TRAIN:200], original["x"][: 200 - TRAIN])
        np.testing.assert_array_equal(handle["y"][:TRAIN], original["y"][...])


def test_per_sample_baseline_is_the_course_design(tmp_path):
    source = write_dataset(tmp_path / "d") / "train.h5"
    image, label = benchmark.PerSampleBaseline(source)[3]
    with h5py.File(source, "r") as handle:
        expected = handle["x"][3].astype(np.float32).transpose(2, 0, 1) / 255
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96) and label == 1
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# perf: layout table, full-size run (scaled down), no-op repro


def test_layout_table(in_tmp_project):
    rows = perf.layout_table(256, [32, 64], ["none", "lzf"], block=64, batch_size=32, repeats=1)
    assert [(r["chunk_patches"], r["compression"]) for r in rows] == [
        (32, "none"),
        (64, "none"),
        (32, "lzf"),
        (64, "lzf"),
    ]
    for row in rows:
        assert row["sequential_read_img_s"] > 0 and row["loader_streaming_img_s"] > 0
        assert row["size_ratio"] > 0
    assert 0.99 < rows[0]["size_ratio"] < 1.05, "uncompressed: about the raw size"
    table = perf.format_layout(rows)
    assert table.count("\n") == 5 and "| 64 (1.7) | lzf |" in table


def test_full_size_run_scaled_down(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr(perf, "BASE_PATCHES", 64)
    monkeypatch.setattr(perf, "FULL_OTHER_SPLITS", 32)
    params = make_params(
        validate={"block_patches": 64}, preprocess={"block_patches": 64}, train={"batch_size": 32}
    )
    root = tmp_path / "full"
    result = perf.full_size(params, patches=500, directory=root)
    assert result["train_patches"] == 500
    for stage in ("validate", "preprocess"):
        figures = result[stage]
        assert figures["img_s"] > 0 and figures["peak_rss_mb"] > 0
        assert figures["fraction_of_raw_warm"] > 0
    assert result["raw_warm_img_s"] == max(result["raw_warm_by_block_img_s"].values())
    assert result["raw_copy_img_s"] > 0 and result["preprocess"]["fraction_of_raw_copy"] > 0
    assert result["validate"]["ok"] is True, "tiled patches are all distinct, no leakage"
    assert result["validate"]["warnings"] == 0
    assert result["preprocess"]["n_out"] == 500 + 2 * 32
    assert result["loader_streaming"]["patches"] == 500
    assert set(result["targets"]) == {
        "validate_at_least_half_of_raw_read",
        "preprocess_at_least_half_of_raw_read",
        "preprocess_at_least_half_of_raw_copy",
        "validate_peak_memory_within_2x_size",
        "preprocess_peak_memory_within_2x_size",
    }
    assert not root.exists(), "everything written is removed"


def test_full_size_refuses_without_disk_space(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 10**6))
    with pytest.raises(perf.PerfError, match=r"needs 15\.\d GB free .* benchmark.full_dir"):
        perf.full_size(make_params(), directory=tmp_path / "full")


def dvc_project(directory: Path) -> Path:
    directory.mkdir()
    bin_dir = Path(sys.executable).parent

    def dvc(*args: str) -> None:
        subprocess.run(
            [str(bin_dir / "dvc"), *args],
            cwd=directory,
            check=True,
            capture_output=True,
            env={
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "DVC_NO_ANALYTICS": "1",
                "HOME": str(directory),
            },
        )

    dvc("init", "--no-scm", "-q")
    dvc("config", "core.site_cache_dir", str(directory / ".dvc" / "site"))
    (directory / "a.txt").write_text("a\n")
    dvc("stage", "add", "-q", "-n", "copy", "-d", "a.txt", "-o", "b.txt", "cp a.txt b.txt")
    return directory


def test_noop_repro_against_status(tmp_path, monkeypatch):
    repo = dvc_project(tmp_path / "repo")
    monkeypatch.setenv("HOME", str(repo))
    with pytest.raises(perf.PerfError, match="run `dvc repro` there first"):
        perf.noop_ratio(repo, repeats=1)
    perf._dvc(repo, "repro")
    result = perf.noop_ratio(repo, repeats=1)
    assert result["dvc_status_s"] > 0 and result["dvc_repro_noop_s"] > 0
    assert result["ratio"] == pytest.approx(result["dvc_repro_noop_s"] / result["dvc_status_s"])


def test_perf_command_line_prints_json(in_tmp_project, capsys):
    shutil.copy(REPO_ROOT / "params.yaml", "params.yaml")
    out = in_tmp_project / "layout.json"
    code = perf.main(
        [
            "--out",
            str(out),
            "layout",
            "--patches",
            "64",
            "--chunks",
            "64",
            "--compression",
            "none",
            "--repeats",
            "1",
        ]
    )
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    assert rows[0]["chunk_patches"] == 64
    assert "| 64 (1.7) | none |" in capsys.readouterr().out
