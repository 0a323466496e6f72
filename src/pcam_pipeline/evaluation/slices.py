"""Per-slice metrics: the test split binned by what the patches look like, the worst bin named."""

from __future__ import annotations

from typing import Any

import numpy as np

from pcam_pipeline.evaluation.metrics import auroc


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
