"""The wrong predictions made with the most confidence, and the grid of their patches."""

from __future__ import annotations

from typing import Any

import numpy as np


def confident_errors(labels: np.ndarray, probs: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Indices of the k wrong predictions made with the most confidence."""
    wrong = np.flatnonzero((probs >= threshold) != labels)
    confidence = np.abs(probs[wrong] - threshold)
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def error_grid(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, indices: np.ndarray
) -> Any:
    """A matplotlib figure of the patches at `indices`, eight a row, each titled with its index,
    label and probability."""
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
