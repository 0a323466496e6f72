"""Pure functions over one slide's patch probabilities: its summary figures and its heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps

UM2_PER_MM2 = 1e6
# The heatmap's colour over the thumbnail: opaque enough to read, thin enough to see tissue.
HEAT_ALPHA = 0.55
HEAT_MAP = "inferno"


@dataclass(frozen=True)
class Tissue:
    """What segmentation found: the mask at thumbnail scale and the thumbnail's spacing."""

    mask: np.ndarray  # (rows, cols) bool
    thumb_um_px: tuple[float, float]  # (x, y) micrometres per thumbnail pixel

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.thumb_um_px[0] * self.thumb_um_px[1] / UM2_PER_MM2


def summarise(
    probabilities: np.ndarray,
    patch_px: int,
    um_px: float,
    tissue: Tissue,
    threshold: float,
    top_k: int,
) -> dict[str, Any]:
    """The slide-level figures: tissue area, patch count, max and top-k mean probability, and the
    area of the patches at or above the model card's threshold (each patch counts whole)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    patch_mm2 = (patch_px * um_px) ** 2 / UM2_PER_MM2
    above = int((probabilities >= threshold).sum())
    k = min(top_k, len(probabilities))
    top = np.sort(probabilities)[::-1][:k]
    return {
        "tissue_area_mm2": round(tissue.area_mm2, 6),
        "patches": len(probabilities),
        "patch_size_px": patch_px,
        "max_probability": float(probabilities.max()) if k else None,
        "top_k": k,
        "top_k_mean_probability": float(top.mean()) if k else None,
        "threshold": threshold,
        "patches_above_threshold": above,
        "area_above_threshold_mm2": round(above * patch_mm2, 6),
    }


def heatmap(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    probabilities: np.ndarray,
    scale: tuple[float, float],
) -> np.ndarray:
    """The thumbnail (rows, cols, 3) uint8 with each patch's probability painted over it.

    `coords` are (N, 4) level-0 (minx, miny, width, height); `scale` is level-0 pixels per
    thumbnail pixel (x, y). Patches become rectangles at thumbnail scale; where none was scored
    (background) the thumbnail shows through unchanged."""
    rows, cols = thumbnail.shape[:2]
    heat = np.full((rows, cols), np.nan, dtype=np.float32)
    for (x, y, w, h), p in zip(coords, probabilities, strict=True):
        c0, r0 = int(x / scale[0]), int(y / scale[1])
        # At least one thumbnail pixel: a patch smaller than a thumbnail pixel must still show.
        c1 = max(int(np.ceil((x + w) / scale[0])), c0 + 1)
        r1 = max(int(np.ceil((y + h) / scale[1])), r0 + 1)
        heat[r0:r1, c0:c1] = p
    scored = ~np.isnan(heat)
    colours = colormaps[HEAT_MAP](np.nan_to_num(heat))[..., :3] * 255.0
    out = thumbnail.astype(np.float32)
    out[scored] = (1 - HEAT_ALPHA) * out[scored] + HEAT_ALPHA * colours[scored]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
