"""The benchmark stage's outputs: reports/benchmark.json (nested dicts of numbers, which
`dvc metrics diff` flattens to dotted keys), the plots under reports/benchmark/, and the summary
it logs."""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch

from pcam_pipeline.bench.measure import peak_rss_mb
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BENCHMARK_DIR, BENCHMARK_FILE
from pcam_pipeline.repro import write_json

log = logging.getLogger(__name__)
LOADER_DESIGNS = (
    ("ours, in memory", "ours_in_memory_img_s"),
    ("ours, streaming", "ours_streaming_img_s"),
    ("per-sample baseline", "per_sample_baseline_img_s"),
    ("raw read (h5py)", "raw_h5py_img_s"),
    ("raw read (pread)", "raw_pread_img_s"),
)


# benchmark.json's figures per architecture
ARCHITECTURE_FIGURES = (
    "parameters",
    "batch_size",
    "end_to_end_img_s",
    "resident_img_s",
    "fed_fraction",
    "pcam_epoch_s",
)


def series(row: dict[str, Any]) -> str:
    return f"{row['device']}_{row['precision']}"


def row_key(row: dict[str, Any]) -> str:
    return f"{series(row)}_bs{row['batch_size']}"


def headline_series(params: Params) -> str:
    """The device and precision the train stage would use here."""
    cuda = torch.cuda.is_available() and params.train.device != "cpu"
    precision = "bf16" if params.train.bf16 and cuda else "fp32"
    return f"{'cuda' if cuda else 'cpu'}_{precision}"


def loader_over_train_step(results: dict[str, Any], params: Params) -> float | None:
    """How many times faster our loader delivers patches than the headline train step uses
    them, at the model table's batch size closest to train.batch_size."""
    rows = [
        row
        for row in results["models"]["rows"]
        if series(row) == results["headline_series"] and "train_img_s" in row
    ]
    if not rows:
        return None
    closest = min(rows, key=lambda row: abs(row["batch_size"] - params.train.batch_size))
    loader = results["loader"]
    return (
        loader.get("ours_in_memory_img_s", loader["ours_streaming_img_s"]) / closest["train_img_s"]
    )


def memory_peaks(results: dict[str, Any]) -> dict[str, float | None]:
    cuda_peaks = [
        row["cuda_max_allocated_mb"]
        for row in results["models"]["rows"]
        if "cuda_max_allocated_mb" in row
    ]
    return {
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_allocated_mb": max(cuda_peaks) if cuda_peaks else None,
    }


def metrics_from(results: dict[str, Any]) -> dict[str, Any]:
    """benchmark.json."""
    rows = results["models"]["rows"]
    model = {
        row_key(r): {k: v for k, v in r.items() if k.endswith(("_s", "_mb")) or k == "oom"}
        for r in rows
    }
    loop = {
        row_key(r): {k: v for k, v in r.items() if isinstance(v, int | float) and k != "batch_size"}
        for r in results["loop"]["rows"]
    }
    architectures = {
        r["model"]: {
            k: v for k, v in r.items() if k in ARCHITECTURE_FIGURES or k in ("oom", "precision")
        }
        for r in results["architectures"]["rows"]
    }
    copied = ("loader", "memory", "targets", "environment", "headline_series")
    timings = ("seconds", "seconds_loader", "seconds_models", "seconds_loop")
    timings += ("seconds_architectures",)
    return {
        **{key: results[key] for key in (*copied, *timings)},
        "loop": loop,
        "architectures": architectures,
        "model": model,
        "latency_batch1": results["models"]["latency_batch1"],
        "skipped": results["models"]["skipped"],
        "errors": {row_key(r): r["error"] for r in rows if "error" in r},
    }


def write_reports(results: dict[str, Any]) -> None:
    write_json(BENCHMARK_FILE, metrics_from(results))
    rows, headline = results["models"]["rows"], results["headline_series"]
    if BENCHMARK_DIR.exists():
        shutil.rmtree(BENCHMARK_DIR)
    # The plot dvc.yaml draws: the device/precision training uses, throughput vs batch size.
    throughput = [
        {
            "batch_size": r["batch_size"],
            "series": headline,
            "train_img_s": r.get("train_img_s"),
            "infer_img_s": r.get("infer_img_s"),
        }
        for r in rows
        if series(r) == headline
    ]
    loop = [
        {
            "batch_size": r["batch_size"],
            "series": series(r),
            "end_to_end_img_s": r.get("end_to_end_img_s"),
            "resident_img_s": r.get("resident_img_s"),
        }
        for r in results["loop"]["rows"]
    ]
    loader = results["loader"]
    designs = [
        {"design": name, "img_s": loader[key]} for name, key in LOADER_DESIGNS if key in loader
    ]
    write_json(BENCHMARK_DIR / "throughput.json", throughput)
    write_json(BENCHMARK_DIR / "loop.json", loop)
    write_json(
        BENCHMARK_DIR / "architectures.json",
        [
            {"model": r["model"], "end_to_end_img_s": r.get("end_to_end_img_s")}
            for r in results["architectures"]["rows"]
        ],
    )
    write_json(BENCHMARK_DIR / "throughput_all.json", [{"series": series(r), **r} for r in rows])
    write_json(BENCHMARK_DIR / "loader.json", designs)


def log_results(results: dict[str, Any]) -> None:
    loader = results["loader"]
    log.info(
        "loader on %d patches: ours %s img/s in memory, %.0f streaming; per-sample baseline "
        "%.0f; raw read %.0f -> %.0fx the baseline, streaming at %.0f%% of raw",
        loader["patches"],
        f"{loader.get('ours_in_memory_img_s', float('nan')):.0f}",
        loader["ours_streaming_img_s"],
        loader["per_sample_baseline_img_s"],
        loader["raw_read_img_s"],
        max(
            loader.get("speedup_in_memory_vs_baseline", 0.0),
            loader["speedup_streaming_vs_baseline"],
        ),
        100 * loader["streaming_fraction_of_raw"],
    )
    for name, met in results["targets"].items():
        if not met:
            log.warning("benchmark target not met: %s", name)
    for reason in results["models"]["skipped"]:
        log.info("benchmark skipped %s", reason)
    for row in results["loop"]["rows"]:
        if "end_to_end_img_s" in row:
            log.info(
                "training loop %s %s batch %d: %.0f img/s end to end, %.0f with the data on "
                "the device (fed %.0f%%): a PCAM epoch in %.1f s",
                row["device"],
                row["precision"],
                row["batch_size"],
                row["end_to_end_img_s"],
                row["resident_img_s"],
                100 * row["fed_fraction"],
                row["pcam_epoch_s"],
            )
    for row in results["architectures"]["rows"]:
        if "end_to_end_img_s" in row:
            log.info(
                "training loop of %s (%d parameters), batch %d: %.0f img/s end to end",
                row["model"],
                row["parameters"],
                row["batch_size"],
                row["end_to_end_img_s"],
            )
    log.info("benchmark done in %.1f s", results["seconds"])
