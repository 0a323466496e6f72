"""Classification metrics, thresholds and calibration: pure functions of labels and scores."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """NaN where undefined: one class only, or scores that are not all numbers (a model that
    diverged), which scikit-learn refuses with an error."""
    if len(np.unique(labels)) < 2 or not np.isfinite(scores).all():
        return float("nan")
    return float(skm.roc_auc_score(labels, scores))


def choose_threshold(labels: np.ndarray, probs: np.ndarray, rule: str, fixed: float = 0.5) -> float:
    """The decision threshold by `rule`: youden (max TPR-FPR), f1 (max F1) or fixed."""
    if rule == "fixed":
        return fixed
    if rule == "youden":
        fpr, tpr, thresholds = skm.roc_curve(labels, probs)
        finite = np.isfinite(thresholds)
        best = np.argmax((tpr - fpr)[finite])
        return float(thresholds[finite][best])
    precision, recall, thresholds = skm.precision_recall_curve(labels, probs)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[np.argmax(f1)])


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Binary ECE: sum over equal-width bins of (bin share) * |positive fraction - mean prob|.

    Bins are [0, 1/b), [1/b, 2/b), ... [(b-1)/b, 1]; these are the points of the calibration
    curve (reports/evaluate/plots/sklearn/calibration.json), weighted by how many patches each
    bin holds.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(labels[members].mean() - probs[members].mean())
    return float(error)


def classification_report(
    labels: np.ndarray, probs: np.ndarray, threshold: float, calibration_bins: int = 10
) -> dict[str, Any]:
    predicted = (probs >= threshold).astype(int)
    eps = 1e-7
    clipped = np.clip(probs, eps, 1 - eps)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "n": len(labels),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
        "auroc": auroc(labels, probs),
        "pr_auc": float(skm.average_precision_score(labels, probs)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "nll": float(skm.log_loss(labels, clipped, labels=[0, 1])),
        "ece": expected_calibration_error(labels, probs, calibration_bins),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
    """Always predicting the train split's majority class: the floor any model must clear."""
    majority = int(train_labels.mean() >= 0.5)
    predicted = np.full(len(test_labels), majority)
    return {
        "class": majority,
        "accuracy": float(skm.accuracy_score(test_labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(test_labels, predicted)),
        "auroc": 0.5,
    }
