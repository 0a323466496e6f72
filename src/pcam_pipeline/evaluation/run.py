"""One evaluation of the best checkpoint: its predictions on every split it needs, then
reports/metrics.json, the per-slice metrics, the dvclive plots and the confident-errors grid.

The I/O is here; what is computed from labels and probabilities is in `report.py`,
`slices.py`, `confident_errors.py` and `metrics.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.pcam import SPLITS
from pcam_pipeline.evaluation.confident_errors import confident_errors, error_grid
from pcam_pipeline.evaluation.report import metrics_report
from pcam_pipeline.evaluation.slices import patch_features, slice_metrics
from pcam_pipeline.inference import predict_split, trained_model
from pcam_pipeline.params import EvaluateParams, LoaderParams
from pcam_pipeline.paths import ERRORS_IMAGE, EVALUATE_DIR, METRICS_FILE, SLICES_FILE
from pcam_pipeline.repro import atomic_path, write_json
from pcam_pipeline.runtime import processed_data


def evaluate_best(
    device: torch.device, bf16: bool, loader: LoaderParams, params: EvaluateParams
) -> dict[str, Any]:
    """Score models/best.pt on data/processed, write every report of the stage and return
    reports/metrics.json's content."""
    model, mean, std, checkpoint = trained_model(device)
    dataset = processed_data()
    splits = {name: Split.open(dataset.split_path(name), loader) for name in SPLITS}
    probs = {
        name: predict_split(
            model,
            DeviceBatches(splits[name], device, loader),
            mean,
            std,
            params.batch_size,
            bf16,
            params.tta,  # the threshold is chosen on valid under the same TTA
        )
        for name in ("valid", "test")
    }
    labels = {name: split.labels.astype(int) for name, split in splits.items()}
    report = metrics_report(
        labels["valid"], probs["valid"], labels["test"], probs["test"], labels["train"], params
    )
    threshold = report["threshold"]["value"]

    test = splits["test"]
    images = test.images.numpy() if test.in_memory else _read_all(test)
    slices = slice_metrics(
        labels["test"], probs["test"], threshold, patch_features(images), params.n_slices
    )
    report["worst_slice"] = {k: slices["worst"][k] for k in ("feature", "bin", "n", "accuracy")}
    report["best_epoch"] = checkpoint["progress"]["best_epoch"]
    write_json(SLICES_FILE, slices)
    write_json(METRICS_FILE, report)

    log_plots(labels["test"], probs["test"], threshold, params.calibration_bins)
    indices = confident_errors(labels["test"], probs["test"], threshold, params.n_error_examples)
    figure = error_grid(images, labels["test"], probs["test"], indices)
    with atomic_path(ERRORS_IMAGE) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    return report


def log_plots(labels: np.ndarray, probs: np.ndarray, threshold: float, bins: int) -> None:
    """The test split's ROC, precision-recall, confusion and calibration plots, via dvclive."""
    from dvclive import Live

    predicted = (probs >= threshold).astype(int)
    with Live(str(EVALUATE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        live.log_sklearn_plot("roc", labels, probs, name="roc.json")
        live.log_sklearn_plot("precision_recall", labels, probs, name="pr.json")
        live.log_sklearn_plot("confusion_matrix", labels, predicted, name="confusion.json")
        live.log_sklearn_plot("calibration", labels, probs, name="calibration.json", n_bins=bins)


def _read_all(split: Split) -> np.ndarray:
    return torch.cat([x for x, _ in split.batches(torch.arange(split.length), 4096)]).numpy()
