"""evaluate: score the best checkpoint on the test split; threshold chosen on validation only.

Writes reports/metrics.json (what `dvc metrics diff` compares), per-slice metrics with the worst
slice named, and the ROC / PR / confusion / calibration plots and a grid of the most confident
errors through dvclive. The work is `evaluation.run.evaluate_best`.
"""

from __future__ import annotations

import logging

from pcam_pipeline.evaluation.run import evaluate_best
from pcam_pipeline.params import Params
from pcam_pipeline.runtime import resolve_device, uses_bf16

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    device = resolve_device(params.train.device)
    bf16 = uses_bf16(params.train.bf16, device)
    report = evaluate_best(device, bf16, params.loader, params.evaluate)
    t = report["test"]
    log.info(
        "test: auroc=%.4f accuracy=%.4f (baseline %.4f) threshold=%.3f (on valid)",
        t["auroc"],
        t["accuracy"],
        report["baseline"]["accuracy"],
        report["threshold"]["value"],
    )
