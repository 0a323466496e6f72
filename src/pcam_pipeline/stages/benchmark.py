"""benchmark: how fast the data path and the model run here, written as DVC metrics and plots.

Four tables, each timing the code the stages run (the measurements are in `bench/`): the
loader designs side by side on the train split's bytes (`bench.loaders`), the model's train
step and inference over batch sizes, devices and precisions (`bench.throughput.time_models`),
and the training loop end to end against its step on resident data
(`bench.throughput.time_loops`), also per architecture of `benchmark.models`
(`bench.throughput.time_architectures`). The full-size validate/preprocess timings are not
part of the stage: `python -m pcam_pipeline.perf full`.
"""

from __future__ import annotations

import time
from typing import Any

from pcam_pipeline.bench.environment import environment
from pcam_pipeline.bench.loaders import loader_targets, time_loader_designs
from pcam_pipeline.bench.tables import (
    headline_series,
    loader_over_train_step,
    log_results,
    memory_peaks,
    write_reports,
)
from pcam_pipeline.bench.throughput import time_architectures, time_loops, time_models
from pcam_pipeline.params import Params
from pcam_pipeline.runtime import processed_data


def run(params: Params) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment()}
    results["loader"] = time_loader_designs(processed_data().split_path("train"), params)
    loader_done = time.perf_counter()
    results["models"] = time_models(params)
    models_done = time.perf_counter()
    results["loop"] = time_loops(params)
    loop_done = time.perf_counter()
    results["architectures"] = time_architectures(params)
    results["seconds_loader"] = loader_done - started
    results["seconds_models"] = models_done - loader_done
    results["seconds_loop"] = loop_done - models_done
    results["seconds_architectures"] = time.perf_counter() - loop_done
    results["targets"] = loader_targets(results["loader"])
    results["headline_series"] = headline_series(params)
    ratio = loader_over_train_step(results, params)
    if ratio is not None:
        results["loader"]["loader_over_train_step"] = ratio
    results["memory"] = memory_peaks(results)
    results["seconds"] = time.perf_counter() - started
    return results


def main(params: Params) -> None:
    results = run(params)
    write_reports(results)
    log_results(results)
