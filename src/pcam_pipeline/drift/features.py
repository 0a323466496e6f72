"""Per-patch image features of uint8 (N,96,96,3) RGB patches, the ones drift is tested on.

Numpy only: `pcam serve` (no torch, no scipy needed for this part) computes them per request.

- colour: each channel's mean, 10th and 90th percentile (scanner and staining shift colour);
- stain: hematoxylin and eosin concentrations (mean and 99th percentile per patch) unmixed with
  Macenko stain vectors, the reference's (Macenko et al., "A method for normalizing histology
  slides for quantitative analysis", ISBI 2009): a stain batch changes these;
- sharpness: log variance of the Laplacian of the grey image (focus, blur, JPEG);
- tissue fraction: the share of pixels whose channels spread by more than TISSUE_SPREAD (stained
  tissue is coloured, glass grey-white): the server's blank-patch notion, one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A pixel is tissue when its channels spread by more than this (stained tissue is coloured,
# glass and background are grey-white); a patch with under TISSUE_SHARE tissue pixels is blank.
TISSUE_SPREAD = 20
TISSUE_SHARE = 0.1

# Macenko's constants: the background intensity, the optical density below which a pixel is
# transparent (not used to find the vectors), and the percentile of the extreme angles.
BACKGROUND = 240.0
OD_THRESHOLD = 0.15
ANGLE_PERCENTILE = 1.0
# Stain vectors of Ruifrok & Johnston (scikit-image's rgb2hed): the fallback where too few
# stained pixels exist to estimate them (blank glass).
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
MIN_STAINED_PIXELS = 100
MACENKO_PIXELS = 200_000  # at most this many stained pixels (a seeded sample) find the vectors
BLOCK = 256  # patches per block: bounded memory for any N

CHANNELS = ("red", "green", "blue")
COLOUR_FEATURES = tuple(
    f"{channel}_{stat}" for channel in CHANNELS for stat in ("mean", "p10", "p90")
)
STAIN_FEATURES = ("hematoxylin_mean", "hematoxylin_p99", "eosin_mean", "eosin_p99")
FEATURES = (*COLOUR_FEATURES, *STAIN_FEATURES, "sharpness", "tissue_fraction")


def tissue_fraction(patches: np.ndarray, stride: int = 1) -> np.ndarray:
    """Per patch: the share of (every `stride`-th) pixels that are tissue, in [0, 1]."""
    sample = patches[:, ::stride, ::stride, :]
    spread = sample.max(axis=3).astype(np.int16) - sample.min(axis=3)
    return (spread > TISSUE_SPREAD).mean(axis=(1, 2))


def blank_fraction(tissue: np.ndarray) -> float:
    """The fraction of patches with under TISSUE_SHARE tissue, from their tissue fractions."""
    return float((tissue < TISSUE_SHARE).mean()) if len(tissue) else 0.0


def optical_density(patches: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density per pixel and channel, float32, >= 0."""
    od = -np.log((patches.astype(np.float32) + 1.0) / BACKGROUND)
    return np.maximum(od, 0.0, out=od)


def macenko_vectors(patches: np.ndarray, seed: int = 0) -> np.ndarray:
    """Macenko's two unit stain vectors (2,3), hematoxylin first, over all pixels of `patches`.

    The optical densities of stained pixels span a plane (their two main eigenvectors); the
    stains are the extreme directions in it (the 1st and 99th percentile of the angle).
    Falls back to Ruifrok's vectors where fewer than MIN_STAINED_PIXELS pixels are stained.
    """
    od = optical_density(patches).reshape(-1, 3)
    stained = od[(od > OD_THRESHOLD).all(axis=1)]
    if len(stained) < MIN_STAINED_PIXELS:
        return RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True)
    if len(stained) > MACENKO_PIXELS:
        rng = np.random.default_rng(seed)
        stained = stained[rng.choice(len(stained), MACENKO_PIXELS, replace=False)]
    stained = stained.astype(np.float64)
    _, vectors = np.linalg.eigh(np.cov(stained, rowvar=False))
    plane = vectors[:, [2, 1]]  # the two largest eigenvalues' vectors (eigh sorts ascending)
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive optical density
    projected = stained @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    ends = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (low, high)])
    ends *= np.where(ends.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    ends /= np.linalg.norm(ends, axis=1, keepdims=True)
    # Hematoxylin absorbs red most: the vector with the larger red component.
    return ends if ends[0, 0] >= ends[1, 0] else ends[::-1].copy()


def stain_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between each stain vector of `a` and the same stain's in `b`."""
    cosine = np.clip(np.sum(a * b, axis=1), -1.0, 1.0)
    return np.degrees(np.arccos(cosine))


def _block_features(patches: np.ndarray, unmix: np.ndarray) -> np.ndarray:
    n = len(patches)
    pixels = patches.reshape(n, -1, 3)
    colour = []
    for c in range(3):
        channel = pixels[:, :, c]
        p10, p90 = np.percentile(channel, [10, 90], axis=1)
        colour += [channel.mean(axis=1, dtype=np.float64), p10, p90]
    concentrations = optical_density(patches).reshape(n, -1, 3) @ unmix.T  # (n, pixels, 2)
    stain = []
    for s in range(2):
        values = concentrations[:, :, s]
        stain += [values.mean(axis=1, dtype=np.float64), np.percentile(values, 99, axis=1)]
    grey = patches.astype(np.float32).mean(axis=3)
    laplacian = (
        4 * grey[:, 1:-1, 1:-1]
        - grey[:, :-2, 1:-1]
        - grey[:, 2:, 1:-1]
        - grey[:, 1:-1, :-2]
        - grey[:, 1:-1, 2:]
    )
    sharpness = np.log1p(laplacian.reshape(n, -1).var(axis=1, dtype=np.float64))
    return np.column_stack([*colour, *stain, sharpness, tissue_fraction(patches)])


@dataclass(frozen=True)
class FeatureTable:
    """Per-patch features: `values` (N, len(FEATURES)), columns named by FEATURES."""

    values: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.values[:, FEATURES.index(name)]


def patch_features(patches: np.ndarray, stain_vectors: np.ndarray) -> FeatureTable:
    """Every feature of FEATURES for each patch, the stains unmixed with `stain_vectors` (2,3)
    (the reference's: the same projection for reference and input, so a stain shift moves the
    concentrations)."""
    unmix = np.linalg.pinv(np.asarray(stain_vectors, dtype=np.float64).T).astype(np.float32)
    blocks = [
        _block_features(patches[start : start + BLOCK], unmix)
        for start in range(0, len(patches), BLOCK)
    ]
    values = np.concatenate(blocks) if blocks else np.empty((0, len(FEATURES)))
    return FeatureTable(values.astype(np.float64))
