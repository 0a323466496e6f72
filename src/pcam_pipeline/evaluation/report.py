"""reports/metrics.json's content: the threshold chosen on validation, the test split's metrics
against the majority baseline. Pure: labels and probabilities in, a JSON-ready dict out."""

from __future__ import annotations

from typing import Any

import numpy as np

from pcam_pipeline.evaluation.metrics import (
    auroc,
    choose_threshold,
    classification_report,
    majority_baseline,
)
from pcam_pipeline.params import EvaluateParams


def metrics_report(
    labels_valid: np.ndarray,
    probs_valid: np.ndarray,
    labels_test: np.ndarray,
    probs_test: np.ndarray,
    train_labels: np.ndarray,
    params: EvaluateParams,
) -> dict[str, Any]:
    threshold = choose_threshold(
        labels_valid, probs_valid, params.threshold_rule, params.fixed_threshold
    )
    test = classification_report(labels_test, probs_test, threshold, params.calibration_bins)
    baseline = majority_baseline(train_labels, labels_test)
    return {
        "tta": params.tta,
        "threshold": {"rule": params.threshold_rule, "value": threshold, "chosen_on": "valid"},
        "valid": {"auroc": auroc(labels_valid, probs_valid), "n": len(labels_valid)},
        "test": test,
        "baseline": baseline,
        "gain_over_baseline": {
            k: test[k] - baseline[k] for k in ("accuracy", "balanced_accuracy", "auroc")
        },
    }
