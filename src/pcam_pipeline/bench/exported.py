"""The exported model against torch, measured on this CPU: what the export_bench stage writes.

Parity on the whole test split (ONNX fp32 against torch as `pcam predict` runs it, int8 against
fp32: AUROC and decisions at evaluate's threshold), then img/s of torch eager, ONNX Runtime
fp32 and int8 at each of `export_bench.batch_sizes`, timed side by side: each round times
every engine once, and each figure is the median over the rounds, so a change of load on the
machine touches all three alike. The figures depend on this CPU's kernels (ONNX Runtime picks
them by CPUID: AVX2, AVX-512, VNNI, AMX), which is why they are not among the export stage's
hashed outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pcam_pipeline import numerics
from pcam_pipeline.bench.measure import median
from pcam_pipeline.data.loader import Split
from pcam_pipeline.evaluation.metrics import auroc
from pcam_pipeline.export.build import FP32_FILE, INT8_FILE
from pcam_pipeline.export.onnx_model import onnx_probabilities, session
from pcam_pipeline.inference import model_from_checkpoint, predict_batches
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BEST_CHECKPOINT, EXPORT_DIR, METRICS_FILE
from pcam_pipeline.repro import read_json
from pcam_pipeline.runtime import processed_data

# The CPU features ONNX Runtime's int8 kernels are chosen by
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
BLOCK = 256


def tiled(patches: np.ndarray, count: int) -> np.ndarray:
    """`count` patches: the test split's, repeated when it has fewer."""
    return np.resize(patches, (count, *patches.shape[1:]))


def side_by_side(engines: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each engine, timed in turn within each round."""
    for run in engines.values():  # warm-up: first-call allocations and graph preparation
        run()
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in seconds.items()}


def time_export(params: Params) -> dict[str, Any]:
    device = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(BEST_CHECKPOINT, device)
    tta = params.export.tta
    fp32, int8 = session(EXPORT_DIR / FP32_FILE), session(EXPORT_DIR / INT8_FILE)
    test = Split.open(processed_data().split_path("test"), params.loader)
    blocks = [x for x, _ in test.batches(torch.arange(test.length), BLOCK)]
    labels = test.labels.astype(int)
    threshold = read_json(METRICS_FILE)["threshold"]["value"]

    p_torch = predict_batches(model, blocks, mean, std, device, tta=tta)
    p_fp32 = onnx_probabilities(fp32, (b.numpy() for b in blocks))
    p_int8 = onnx_probabilities(int8, (b.numpy() for b in blocks))
    parity = {
        "test_patches": int(test.length),
        "fp32_max_abs_delta_p": float(np.max(np.abs(p_fp32 - p_torch))),
        "fp32_decisions_differing": int(np.sum((p_fp32 >= threshold) != (p_torch >= threshold))),
        "fp32_auroc": auroc(labels, p_fp32),
        "int8_auroc": auroc(labels, p_int8),
        "int8_max_abs_delta_p": float(np.max(np.abs(p_int8 - p_fp32))),
        "int8_decision_agreement": float(np.mean((p_int8 >= threshold) == (p_fp32 >= threshold))),
    }
    parity["int8_auroc_drop"] = parity["fp32_auroc"] - parity["int8_auroc"]

    patches = torch.cat(blocks).numpy()
    rows = []
    for batch in params.export_bench.batch_sizes:
        x = tiled(patches, batch)
        x_torch = torch.from_numpy(x)
        seconds = side_by_side(
            {
                "torch_eager": lambda x_torch=x_torch: predict_batches(
                    model, [x_torch], mean, std, device, tta=tta
                ),
                "onnx_fp32": lambda x=x: onnx_probabilities(fp32, [x]),
                "onnx_int8": lambda x=x: onnx_probabilities(int8, [x]),
            },
            params.export_bench.rounds,
        )
        row: dict[str, Any] = {"batch_size": batch}
        row.update({f"{name}_img_s": batch / s for name, s in seconds.items()})
        row["int8_over_fp32"] = row["onnx_int8_img_s"] / row["onnx_fp32_img_s"]
        row["fp32_over_torch"] = row["onnx_fp32_img_s"] / row["torch_eager_img_s"]
        rows.append(row)

    import onnxruntime

    flags = numerics.cpu_identity()["flags"]
    return {
        "parity": parity,
        "rows": rows,
        "sizes_bytes": {
            name: (EXPORT_DIR / name).stat().st_size for name in (FP32_FILE, INT8_FILE)
        },
        "onnxruntime": onnxruntime.__version__,
        "cpu_kernel_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
        "torch_threads": torch.get_num_threads(),
        "tta": tta,
    }
