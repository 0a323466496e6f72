"""Synthetic PCAM-like patches: deterministic from a seed, with a signal a model can learn.

Each patch is rendered through the Beer-Lambert law from two stain densities, hematoxylin
(nuclei, blue-purple) and eosin (stroma, pink), with per-patch stain vectors and brightness so
colour varies the way it does between slides. Every patch has scattered normal nuclei; in a
positive patch the centre 32x32 region (the region that defines PCAM's label) also holds a
cluster of large, dense, crowded nuclei, the texture of tumour cells. Some negatives get a dense
cluster of small nuclei off-centre (inflammation) so that "dark pixels" alone is not the answer.
A few negatives are blank glass (near-white everywhere), as in scanned slides, so the blank-patch
checks and filter have something to find.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pcam_pipeline.data.pcam import PATCH_SHAPE, SPLITS

SIZE = PATCH_SHAPE[0]
CENTRE = slice(32, 64)
BLOCK = 256  # patches generated per seeded block, so a split's content does not depend on memory
BLANK_FRACTION = 0.005

_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])


def _nuclei(
    rng: np.random.Generator,
    n: int,
    density: float,
    radius: float,
    region: tuple[slice, slice] | None = None,
) -> np.ndarray:
    """Blob map (n,96,96) in [0,1]: random seeds blurred into round nuclei of about `radius`."""
    seeds = (rng.random((n, SIZE, SIZE)) < density).astype(np.float32)
    if region is not None:
        mask = np.zeros((SIZE, SIZE), dtype=np.float32)
        mask[region] = 1.0
        seeds *= mask
    blobs = ndimage.gaussian_filter(seeds, sigma=(0, radius, radius)) * (2 * np.pi * radius**2)
    return np.clip(blobs, 0.0, 1.0)


def _render_block(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    n = len(labels)
    positive = labels.astype(bool)
    # Stroma: smooth eosin field from upsampled low-resolution noise.
    coarse = rng.random((n, 12, 12)).astype(np.float32)
    eosin = 0.25 + 0.45 * ndimage.zoom(coarse, (1, SIZE / 12, SIZE / 12), order=1)
    hema = 0.9 * _nuclei(rng, n, density=0.0025, radius=1.6)

    # Tumour clusters range from florid to barely there, so some positives are hard.
    tumour = _nuclei(rng, n, density=0.008, radius=2.2, region=(CENTRE, CENTRE))
    strength = rng.uniform(0.0, 0.8, size=(n, 1, 1)).astype(np.float32)
    hema += positive[:, None, None] * strength * 1.2 * tumour

    # Inflammation in a random quadrant of 30% of negatives: dense but small nuclei.
    inflamed = (~positive) & (rng.random(n) < 0.3)
    corner = rng.integers(0, 2, size=(n, 2)) * 56
    cluster = _nuclei(rng, n, density=0.03, radius=1.2)
    window = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for i in np.flatnonzero(inflamed):
        r, c = corner[i]
        window[i, r : r + 40, c : c + 40] = 1.0
    hema += 1.0 * cluster * window

    # Per-patch stain vectors and overall intensity: the colour variation between slides.
    h_vec = _HEMATOXYLIN + rng.normal(0, 0.05, size=(n, 3))
    e_vec = _EOSIN + rng.normal(0, 0.05, size=(n, 3))
    scale = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1))
    density = scale * (
        hema[..., None] * h_vec[:, None, None, :] * 1.6 + eosin[..., None] * e_vec[:, None, None, :]
    )
    rgb = 255.0 * np.exp(-density) + rng.normal(0, 4.0, size=(n, SIZE, SIZE, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def generate_split(
    seed: int, split: str, size: int, positive_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Patches (size,96,96,3) uint8 and labels (size,) uint8 of a split; same seed, same bytes."""
    split_key = SPLITS.index(split)
    label_rng = np.random.default_rng([seed, split_key])
    labels = np.zeros(size, dtype=np.uint8)
    labels[: round(size * positive_fraction)] = 1
    label_rng.shuffle(labels)
    x = np.empty((size, *PATCH_SHAPE), dtype=np.uint8)
    for block_index, start in enumerate(range(0, size, BLOCK)):
        stop = min(start + BLOCK, size)
        rng = np.random.default_rng([seed, split_key, block_index])
        x[start:stop] = _render_block(rng, labels[start:stop])
    negatives = np.flatnonzero(labels == 0)
    blank = label_rng.choice(negatives, size=int(len(negatives) * BLANK_FRACTION), replace=False)
    x[blank] = label_rng.integers(247, 256, size=(len(blank), *PATCH_SHAPE), dtype=np.uint8)
    return x, labels
