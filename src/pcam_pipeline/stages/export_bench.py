"""export_bench: the exported model against torch on this CPU, as DVC metrics.

Parity on the whole test split (ONNX fp32 against torch as `pcam predict` runs it; int8's
AUROC and decisions beside fp32's) and img/s of torch eager, ONNX Runtime fp32 and int8 timed
side by side (`bench.exported`). The figures depend on this CPU's kernels, so they are kept
apart from the export's hashed files: a fresh clone that reproduces the export byte for byte
skips this stage, as it skips the benchmark, and an experiment that trains another model
re-runs only this, not the benchmark's loader and training-loop tables.
"""

from __future__ import annotations

import logging

from pcam_pipeline.bench.exported import time_export
from pcam_pipeline.params import Params
from pcam_pipeline.paths import EXPORT_BENCH_FILE
from pcam_pipeline.repro import write_json

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    results = time_export(params)
    write_json(EXPORT_BENCH_FILE, results)
    for row in results["rows"]:
        log.info(
            "exported model, batch %d: torch eager %.0f img/s, ONNX fp32 %.0f, int8 %.0f "
            "(int8/fp32 %.2fx)",
            row["batch_size"],
            row["torch_eager_img_s"],
            row["onnx_fp32_img_s"],
            row["onnx_int8_img_s"],
            row["int8_over_fp32"],
        )
    parity = results["parity"]
    log.info(
        "exported model on %d test patches: fp32 max |dp| %.2g against torch; int8 AUROC %.4f "
        "beside fp32's %.4f, decisions agree on %.1f%%",
        parity["test_patches"],
        parity["fp32_max_abs_delta_p"],
        parity["int8_auroc"],
        parity["fp32_auroc"],
        100 * parity["int8_decision_agreement"],
    )
