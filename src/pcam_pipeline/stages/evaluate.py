"""evaluate: score the best checkpoint on the test split; threshold chosen on validation only.

Writes reports/metrics.json (what `dvc metrics diff` compares), per-slice metrics with the worst
slice named, and the ROC / PR / confusion / calibration plots and a grid of the most confident
errors through dvclive.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.pcam import SPLITS
from pcam_pipeline.errors import CheckpointError, PipelineError
from pcam_pipeline.inference import model_from_checkpoint, predict_split
from pcam_pipeline.metrics import auroc, choose_threshold, classification_report, majority_baseline
from pcam_pipeline.params import EvaluateParams, Params
from pcam_pipeline.paths import (
    BEST_CHECKPOINT,
    ERRORS_IMAGE,
    EVALUATE_DIR,
    METRICS_FILE,
    SLICES_FILE,
)
from pcam_pipeline.repro import atomic_path, write_json
from pcam_pipeline.runtime import processed_data, resolve_device, uses_bf16

log = logging.getLogger(__name__)


def patch_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch brightness (mean pixel value) and stain intensity.

    Stain intensity is the mean optical density of the red channel, which hematoxylin (nuclei)
    absorbs most: a proxy for how dark the nuclear stain came out on that slide.
    """
    brightness = images.reshape(len(images), -1).mean(axis=1)
    optical_density = -np.log((images[..., 0].astype(np.float64) + 1.0) / 256.0)
    return {
        "brightness": brightness,
        "stain_intensity": optical_density.reshape(len(images), -1).mean(axis=1),
    }


def slice_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    features: dict[str, np.ndarray],
    n_slices: int,
) -> dict[str, Any]:
    """Accuracy and AUROC in quantile bins of each feature; the slice with lowest accuracy."""
    rows = []
    for name, values in features.items():
        edges = np.quantile(values, np.linspace(0, 1, n_slices + 1))
        which = np.clip(np.searchsorted(edges[1:-1], values, side="right"), 0, n_slices - 1)
        for b in range(n_slices):
            members = which == b
            if not members.any():
                continue
            predicted = probs[members] >= threshold
            rows.append(
                {
                    "feature": name,
                    "bin": b,
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(members.sum()),
                    "positive_fraction": float(labels[members].mean()),
                    "accuracy": float((predicted == labels[members]).mean()),
                    "auroc": auroc(labels[members], probs[members]),
                }
            )
    worst = min(rows, key=lambda row: row["accuracy"])
    return {"slices": rows, "worst": worst}


def confident_errors(labels: np.ndarray, probs: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Indices of the k wrong predictions made with the most confidence."""
    wrong = np.flatnonzero((probs >= threshold) != labels)
    confidence = np.abs(probs[wrong] - threshold)
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def error_grid(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, indices: np.ndarray
) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 8
    rows = max(1, -(-len(indices) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, indices, strict=False):
        axis.imshow(images[index])
        axis.set_title(f"#{index} y={labels[index]} p={probs[index]:.2f}", fontsize=7)
    figure.suptitle("Most confident errors on the test split")
    figure.tight_layout()
    return figure


def evaluate(
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


def log_plots(labels: np.ndarray, probs: np.ndarray, threshold: float, bins: int) -> None:
    """The test split's ROC, precision-recall, confusion and calibration plots, via dvclive."""
    from dvclive import Live

    predicted = (probs >= threshold).astype(int)
    with Live(str(EVALUATE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        live.log_sklearn_plot("roc", labels, probs, name="roc.json")
        live.log_sklearn_plot("precision_recall", labels, probs, name="pr.json")
        live.log_sklearn_plot("confusion_matrix", labels, predicted, name="confusion.json")
        live.log_sklearn_plot("calibration", labels, probs, name="calibration.json", n_bins=bins)


def main(params: Params) -> None:
    device = resolve_device(params.train.device)
    try:
        model, mean, std, checkpoint = model_from_checkpoint(BEST_CHECKPOINT, device)
    except CheckpointError as error:
        # A DVC output: not moved aside (DVC restores it from its cache), only named.
        raise PipelineError(
            f"{BEST_CHECKPOINT}: {error.reason}. Fix: train again (`dvc repro train`) or "
            f"restore it from the DVC cache (`dvc checkout {BEST_CHECKPOINT}`)"
        ) from None
    bf16 = uses_bf16(params.train.bf16, device)
    dataset = processed_data()
    splits = {name: Split.open(dataset.split_path(name), params.loader) for name in SPLITS}
    probs = {
        name: predict_split(
            model,
            DeviceBatches(splits[name], device, params.loader),
            mean,
            std,
            params.evaluate.batch_size,
            bf16,
            params.evaluate.tta,  # the threshold is chosen on valid under the same TTA
        )
        for name in ("valid", "test")
    }
    labels = {name: split.labels.astype(int) for name, split in splits.items()}
    report = evaluate(
        labels["valid"],
        probs["valid"],
        labels["test"],
        probs["test"],
        labels["train"],
        params.evaluate,
    )
    threshold = report["threshold"]["value"]

    test = splits["test"]
    images = test.images.numpy() if test.in_memory else _read_all(test)
    slices = slice_metrics(
        labels["test"], probs["test"], threshold, patch_features(images), params.evaluate.n_slices
    )
    report["worst_slice"] = {k: slices["worst"][k] for k in ("feature", "bin", "n", "accuracy")}
    report["best_epoch"] = checkpoint["progress"]["best_epoch"]
    write_json(SLICES_FILE, slices)
    write_json(METRICS_FILE, report)

    log_plots(labels["test"], probs["test"], threshold, params.evaluate.calibration_bins)
    indices = confident_errors(
        labels["test"], probs["test"], threshold, params.evaluate.n_error_examples
    )
    figure = error_grid(images, labels["test"], probs["test"], indices)
    with atomic_path(ERRORS_IMAGE) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    t = report["test"]
    log.info(
        "test: auroc=%.4f accuracy=%.4f (baseline %.4f) threshold=%.3f (on valid)",
        t["auroc"],
        t["accuracy"],
        report["baseline"]["accuracy"],
        threshold,
    )


def _read_all(split: Split) -> np.ndarray:
    return torch.cat([x for x, _ in split.batches(torch.arange(split.length), 4096)]).numpy()
