"""The benchmark stage (bench/) and the measurements beside it (perf/), on a tiny processed
dataset: the figures they report must be the ones their own counts and timings give."""

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

from pcam_pipeline.bench import loaders, throughput
from pcam_pipeline.bench.measure import PCAM_TRAIN_PATCHES
from pcam_pipeline.bench.timing import is_out_of_memory
from pcam_pipeline.data.pcam import PATCH_BYTES, PATCH_SHAPE
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.writers import ProcessedLayout, ProcessedWriter
from pcam_pipeline.models.architectures import build_model
from pcam_pipeline.params import Params
from pcam_pipeline.perf import chunking, full_size, noop
from pcam_pipeline.perf.__main__ import main as perf_main
from pcam_pipeline.perf.children import PerfError
from pcam_pipeline.stages import benchmark
from pcam_pipeline.train import loop as training
from tests.conftest import REPO_ROOT

TRAIN = 128
CPU = torch.device("cpu")


def write_dataset(directory: Path, n: int = TRAIN) -> Path:
    dataset = ProcessedData(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, *PATCH_SHAPE), dtype=np.uint8)
    with ProcessedWriter(dataset.split_path("train"), ProcessedLayout(32, "none")) as writer:
        writer.append(x, (np.arange(n) % 2).astype(np.uint8), np.arange(n))
    dataset.stats_path.write_text(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3}))
    return directory


BENCHMARK = {
    "batch_sizes": [1, 8],
    "devices": ["cpu", "cuda"],
    "precisions": ["fp32", "bf16"],
    "warmup_iters": 1,
    "timed_iters": 2,
    "latency_iters": 3,
    "loader_patches": 300,
    "baseline_patches": 16,
    "models": ["train", "mlp"],
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


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-9)


def check_loader_figures(loader: dict[str, Any]) -> None:
    """Each derived loader figure is what the rates it is made of give."""
    assert loader["patches"] == 300 and loader["distinct_patches"] == TRAIN, "tiled to size"
    assert loader["baseline_patches"] == 16 and loader["batch_size"] == 16
    raw = max(loader["raw_h5py_img_s"], loader["raw_pread_img_s"])
    assert loader["raw_read_img_s"] == raw
    assert loader["raw_read_gb_s"] == approx(raw * PATCH_BYTES / 1e9)
    baseline = loader["per_sample_baseline_img_s"]
    assert loader["speedup_streaming_vs_baseline"] == approx(
        loader["ours_streaming_img_s"] / baseline
    )
    assert loader["speedup_in_memory_vs_baseline"] == approx(
        loader["ours_in_memory_img_s"] / baseline
    )
    assert loader["streaming_fraction_of_raw"] == approx(loader["ours_streaming_img_s"] / raw)
    assert loader["in_memory_fraction_of_raw"] == approx(loader["ours_in_memory_img_s"] / raw)
    # Whole batches from memory against a file opened per patch: far apart, whatever the load.
    assert loader["speedup_in_memory_vs_baseline"] > 2
    # With the load, an epoch cannot be faster than without it.
    assert loader["ours_in_memory_with_load_img_s"] < loader["ours_in_memory_img_s"]
    assert loader["normalise_augment_cpu_img_s"] > 0 and loader["normalise_cpu_img_s"] > 0


def check_model_rows(model: dict[str, Any]) -> None:
    assert set(model) == {"cpu_fp32_bs1", "cpu_fp32_bs8"}, "bf16 never runs on the CPU"
    for key, batch_size in (("cpu_fp32_bs1", 1), ("cpu_fp32_bs8", 8)):
        row = model[key]
        assert row["train_img_s"] == approx(batch_size / row["train_step_s"])
        assert row["infer_img_s"] == approx(batch_size / row["infer_batch_s"])
        assert row["rss_mb"] > 0


def check_loop_rows(loop: dict[str, Any]) -> None:
    assert set(loop) == {"cpu_fp32_bs1", "cpu_fp32_bs8"}
    for key, batch_size in (("cpu_fp32_bs1", 1), ("cpu_fp32_bs8", 8)):
        row = loop[key]
        steps, seen = row["steps"], row["seen"]
        assert (steps - 1) * batch_size < seen <= steps * batch_size
        assert row["end_to_end_img_s"] == approx(seen / row["end_to_end_s"])
        assert row["resident_img_s"] == approx(steps * batch_size / row["resident_s"])
        assert row["fed_fraction"] == approx(row["end_to_end_img_s"] / row["resident_img_s"])
        # The resident step plus the loader: near the step's own speed, on a busy machine within
        # a few times of it; a rate off by the batch size (8) falls outside.
        assert 0.2 < row["fed_fraction"] < 5, row
        assert row["pcam_epoch_s"] == approx(PCAM_TRAIN_PATCHES / row["end_to_end_img_s"])


def test_stage_writes_metrics_and_plots(project, params, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu-short")
    benchmark.main(params)
    metrics = json.loads(Path("reports/benchmark.json").read_text())
    check_loader_figures(metrics["loader"])
    check_model_rows(metrics["model"])
    check_loop_rows(metrics["loop"])
    closest = metrics["model"]["cpu_fp32_bs8"]["train_img_s"]  # train.batch_size is 16
    ratio = metrics["loader"]["ours_in_memory_img_s"] / closest
    assert metrics["loader"]["loader_over_train_step"] == approx(ratio)
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
    assert any(s.startswith("cpu bf16") for s in metrics["skipped"])
    if not torch.cuda.is_available():
        assert any("CUDA path not measured" in s for s in metrics["skipped"])
    assert metrics["errors"] == {}
    tables = metrics["seconds_loader"] + metrics["seconds_models"] + metrics["seconds_loop"]
    assert 0 < tables <= metrics["seconds"]
    throughput_plot = json.loads(Path("reports/benchmark/throughput.json").read_text())
    assert [r["batch_size"] for r in throughput_plot] == [1, 8]
    assert all(r["series"] == metrics["headline_series"] == "cpu_fp32" for r in throughput_plot)
    designs = {
        r["design"]: r["img_s"]
        for r in json.loads(Path("reports/benchmark/loader.json").read_text())
    }
    assert designs["ours, streaming"] == metrics["loader"]["ours_streaming_img_s"]
    assert {"ours, in memory", "per-sample baseline", "raw read (pread)"} <= set(designs)
    assert not list(Path("tmp").glob("pcam-benchmark-*")), "the tiled file is removed"
    architectures = metrics["architectures"]
    assert list(architectures) == ["cnn", "mlp"], "train (its cnn), then the listed mlp"
    assert architectures["cnn"]["parameters"] == sum(
        p.numel() for p in build_model(params.train).parameters()
    )
    for row in architectures.values():
        assert row["batch_size"] == 16 and row["precision"] == "fp32"
        assert row["fed_fraction"] == approx(row["end_to_end_img_s"] / row["resident_img_s"])
    plot = json.loads(Path("reports/benchmark/architectures.json").read_text())
    assert [r["model"] for r in plot] == ["cnn", "mlp"]


def test_a_benchmark_models_entry_names_the_architecture(params):
    assert throughput.architecture(params.train, "train") == params.train
    assert throughput.architecture(params.train, "mlp").model == "mlp"
    resnet = throughput.architecture(params.train, "resnet50")
    assert (resnet.model, resnet.timm.name, resnet.timm.pretrained) == ("timm", "resnet50", None)
    assert resnet.batch_size == params.train.batch_size


def test_the_model_table_times_the_real_train_step(params, monkeypatch):
    """Every timed step is a `training.TrainStep` call on the batch, and it trains the model."""
    batches: list[int] = []
    real = training.TrainStep.__call__

    def counted(step, x, *args, **kwargs):
        batches.append(len(x))
        return real(step, x, *args, **kwargs)

    monkeypatch.setattr(training.TrainStep, "__call__", counted)
    model = training.prepare_model(params.train, CPU)
    before = [p.detach().clone() for p in model.parameters()]
    at_four = params.train.model_copy(update={"batch_size": 4})
    row = throughput.time_model(model, at_four, params.benchmark, CPU)
    assert batches == [4] * (params.benchmark.warmup_iters + params.benchmark.timed_iters)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert row["train_img_s"] == approx(4 / row["train_step_s"])


def test_out_of_memory_is_a_result_not_a_crash(project, params, monkeypatch):
    real = training.normalise

    def normalise(x, *args, **kwargs):
        if x.shape[0] >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(training, "normalise", normalise)
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
    loops = {r["batch_size"]: r for r in results["loop"]["rows"]}
    assert loops[8]["oom"] == 1 and loops[1]["end_to_end_img_s"] > 0
    benchmark.write_reports(results)
    metrics = json.loads(Path("reports/benchmark.json").read_text())
    assert metrics["model"]["cpu_fp32_bs8"] == {"oom": 1}
    assert "out of memory" in metrics["errors"]["cpu_fp32_bs8"]


def test_other_errors_are_not_swallowed(params, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(training, "normalise", broken)
    model = training.prepare_model(params.train, CPU)
    with pytest.raises(RuntimeError, match="shapes"):
        throughput.time_model(model, params.train, params.benchmark, CPU)
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_benchmark_file_keeps_the_layout(tmp_path):
    source = ProcessedData(write_dataset(tmp_path / "d")).split_path("train")
    path, distinct = loaders.benchmark_file(source, 200, tmp_path)
    with h5py.File(path, "r") as handle, h5py.File(source, "r") as original:
        assert handle["x"].shape == (200, *PATCH_SHAPE) and distinct == TRAIN
        assert handle["x"].chunks == original["x"].chunks
        np.testing.assert_array_equal(handle["x"][TRAIN:200], original["x"][: 200 - TRAIN])
        np.testing.assert_array_equal(handle["y"][:TRAIN], original["y"][...])


def test_per_sample_baseline_is_the_course_design(tmp_path):
    source = ProcessedData(write_dataset(tmp_path / "d")).split_path("train")
    image, label = loaders.PerSampleBaseline(source)[3]
    with h5py.File(source, "r") as handle:
        expected = handle["x"][3].astype(np.float32).transpose(2, 0, 1) / 255
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96) and label == 1
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# python -m pcam_pipeline.perf: HDF5 chunking table, full-size run (scaled down), no-op repro


def test_layout_table(in_tmp_project):
    rows = chunking.layout_table(256, [32, 64], ["none", "lzf"], block=64, batch_size=32, repeats=1)
    assert [(r["storage"], r["chunk_patches"], r["compression"]) for r in rows] == [
        ("contiguous", None, "none"),
        ("chunked", 32, "none"),
        ("chunked", 64, "none"),
        ("chunked", 32, "lzf"),
        ("chunked", 64, "lzf"),
    ]
    for row in rows:
        assert row["sequential_read_img_s"] > 0 and row["loader_streaming_img_s"] > 0
        if row["storage"] == "chunked":
            assert row["chunk_mb"] == approx(row["chunk_patches"] * PATCH_BYTES / 2**20)
    for row in rows[:3]:
        assert 0.99 < row["size_ratio"] < 1.05, "uncompressed: about the raw size"
    table = chunking.format_layout(rows)
    assert table.count("\n") == 6 and "| chunked: 64 (1.7) | lzf |" in table
    assert "| contiguous | none |" in table


def test_full_size_run_scaled_down(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr(full_size, "BASE_PATCHES", 64)
    monkeypatch.setattr(full_size, "FULL_OTHER_SPLITS", 32)
    params = make_params(
        validate={"block_patches": 64}, preprocess={"block_patches": 64}, train={"batch_size": 32}
    )
    root = tmp_path / "full"
    result = full_size.full_size(params, patches=500, directory=root)
    total = 500 + 2 * 32
    assert result["train_patches"] == 500 and result["other_split_patches"] == 64
    for stage in ("validate", "preprocess"):
        figures = result[stage]
        assert figures["img_s"] > 0
        assert figures["fraction_of_raw_warm"] == approx(
            figures["img_s"] / result["raw_warm_img_s"]
        )
        # Their children load what the stages load: no torch (importing it alone takes 226 MB).
        assert 0 < figures["peak_rss_mb"] < 200, figures
    preprocess = result["preprocess"]
    assert preprocess["img_s"] == approx(total / preprocess["seconds"])
    assert result["raw_warm_img_s"] == max(result["raw_warm_by_block_img_s"].values())
    assert result["raw_copy_img_s"] == approx(max(result["raw_copy_runs_img_s"]))
    assert preprocess["fraction_of_raw_copy"] == approx(
        preprocess["img_s"] / result["raw_copy_img_s"]
    )
    assert result["validate"]["ok"] is True, "tiled patches are all distinct, no leakage"
    assert result["validate"]["warnings"] == 0
    assert preprocess["n_out"] == total
    streaming = result["loader_streaming"]
    assert streaming["patches"] == 500
    assert streaming["fraction_of_raw"] == approx(streaming["img_s"] / streaming["raw_read_img_s"])
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
    with pytest.raises(PerfError, match=r"needs 15\.\d GB free .* give --dir a roomier place"):
        full_size.full_size(make_params(), directory=tmp_path / "full")


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
    with pytest.raises(PerfError, match="run `dvc repro` there first"):
        noop.noop_ratio(repo, repeats=1)
    noop.dvc(repo, "repro")
    result = noop.noop_ratio(repo, repeats=1)
    assert result["dvc_status_s"] > 0 and result["dvc_repro_noop_s"] > 0
    assert result["ratio"] == pytest.approx(result["dvc_repro_noop_s"] / result["dvc_status_s"])


def test_perf_command_line_prints_json(in_tmp_project, capsys):
    shutil.copy(REPO_ROOT / "params.yaml", "params.yaml")
    out = in_tmp_project / "layout.json"
    arguments = ["layout", "--patches", "64", "--chunks", "64", "--compression", "none"]
    code = perf_main(["--out", str(out), *arguments, "--repeats", "1"])
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    assert rows[0]["storage"] == "contiguous" and rows[1]["chunk_patches"] == 64
    assert "| chunked: 64 (1.7) | none |" in capsys.readouterr().out
