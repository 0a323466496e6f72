"""Small synthetic whole-slide images for tests of slide-level tools (WSInfer, tiffslide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

TILE = 256
PATCH = 96  # the exported model's patch side at its 1 um/px
# Downsamples of the pyramid's levels below level 0: slide readers (tiffslide, OpenSlide) pick
# thumbnails and tissue masks from these, so a flat single-level TIFF would not exercise them.
DOWNSAMPLES = (2, 4)
BACKGROUND = 240
# H&E-like tissue colours (RGB): eosin pink and haematoxylin purple, mixed by a texture field.
EOSIN = np.array([232.0, 150.0, 200.0], dtype=np.float32)
HAEMATOXYLIN = np.array([150.0, 80.0, 165.0], dtype=np.float32)


def _blobs(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A (height, width) bool mask of two irregular ellipses, a third of the slide across each,
    apart, so that both make patches of their own.

    WSInfer drops tissue objects under 200 x 200 um (its default): at 1 um/px a slide 1,200 px
    or more on each side makes blobs it keeps."""
    mask = np.zeros((height, width), dtype=bool)
    rx, ry = 0.17 * width, 0.22 * height
    for fx, fy in ((0.3, 0.4), (0.7, 0.6)):
        cx, cy = fx * width, fy * height
        # Only the blob's bounding box (the wobble is at most 1.24): a quarter of the slide.
        x0, x1 = max(int(cx - 1.25 * rx), 0), min(int(cx + 1.25 * rx) + 1, width)
        y0, y1 = max(int(cy - 1.25 * ry), 0), min(int(cy + 1.25 * ry) + 1, height)
        dy, dx = np.ogrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
        dx, dy = dx.astype(np.float32), dy.astype(np.float32)
        angle = np.arctan2(dy, dx)
        # A wobbly edge, as tissue has, not a perfect ellipse.
        phase = rng.uniform(0, 2 * np.pi, size=3)
        wobble = 1 + 0.08 * sum(
            np.sin(k * angle + p) for k, p in zip((3, 5, 7), phase, strict=True)
        )
        mask[y0:y1, x0:x1] |= (dx / rx) ** 2 + (dy / ry) ** 2 <= wobble**2
    return mask


def _smooth_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Values in [0, 1] varying over about `cell` pixels: a coarse random grid, upsampled."""
    coarse = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
    fine = np.kron(coarse, np.ones((cell, cell), dtype=np.float32))
    return fine[:height, :width]


def slide_pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """The level-0 RGB image (height, width, 3) uint8 that `write_test_slide` writes."""
    rng = np.random.default_rng(seed)
    tissue = _blobs(width, height, rng)
    # Nuclei-sized purple clumps on pink stroma, plus pixel noise: texture a CNN responds to,
    # so that patches differ from one another and probabilities are not all equal.
    mix = 0.6 * _smooth_noise(height, width, 8, rng) + 0.4 * _smooth_noise(height, width, 32, rng)
    mix = np.clip((mix - 0.35) * 2.0, 0.0, 1.0)[tissue][:, None]
    colour = (1 - mix) * EOSIN + mix * HAEMATOXYLIN
    colour += rng.standard_normal(size=colour.shape, dtype=np.float32) * 8.0
    # The background's noise is the same in all three channels: grey, zero saturation, so that
    # WSInfer's saturation threshold (7 of 255) keeps it out of the tissue mask.
    grey = rng.integers(BACKGROUND - 3, BACKGROUND + 4, size=(height, width, 1), dtype=np.uint8)
    image = np.repeat(grey, 3, axis=2)
    image[tissue] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    return image


def tissue_mask(width: int, height: int, seed: int = 0) -> np.ndarray:
    """The (height, width) bool tissue mask of `slide_pixels(width, height, seed)` and of
    `tumour_slide_pixels`: the ground truth a segmentation is measured against."""
    return _blobs(width, height, np.random.default_rng(seed))


def tumour_slide_pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """`slide_pixels`' two blobs filled instead with the synthetic PCAM generator's patches
    (src/pcam_pipeline/data/synthetic.py) on a 96-pixel grid from the origin, the grid WSInfer
    patches a 1 um/px slide on: the right blob (patch centres right of the middle) with
    positive-class patches (tumour nuclei in the centre), the left one with negatives. A model
    trained on that generator then scores the right blob hot and the left one cold."""
    from pcam_pipeline.data.synthetic import generate_split

    tissue = tissue_mask(width, height, seed)
    size = PATCH
    cols, rows = -(-width // size), -(-height // size)
    positive, _ = generate_split(seed, "test", rows * cols, positive_fraction=1.0)
    negative, _ = generate_split(seed + 1, "test", rows * cols, positive_fraction=0.0)
    right = (np.arange(cols) * size + size // 2) > width // 2
    grid = (rows, cols, size, size, 3)
    cells = np.where(
        right[None, :, None, None, None], positive.reshape(grid), negative.reshape(grid)
    )
    mosaic = cells.transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3)[:height, :width]
    image = slide_pixels(width, height, seed)
    image[tissue] = mosaic[tissue]
    return image


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block: a pyramid level as most slide writers make one."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_test_slide(
    path: Path | str,
    width: int,
    height: int,
    mpp: float | None = 1.0,
    seed: int = 0,
    pixels: np.ndarray | None = None,
) -> Path:
    """Write a pyramidal, tiled (256 x 256), deflate-compressed RGB TIFF of white background
    with two H&E-coloured tissue blobs; `mpp` um/px at level 0, in the resolution tags.

    Deflate is lossless, so a reader gets back exactly `slide_pixels(width, height, seed)` at
    level 0; JPEG would make the expected pixels depend on the decoder. The reduced levels are
    SubIFDs of level 0, the layout tifffile and tiffslide read as one pyramid, and tiffslide
    takes mpp from ResolutionUnit CENTIMETER and X/YResolution (pixels per cm = 1e4 / mpp).
    `mpp=None`: no resolution tags, a slide without a physical spacing. `pixels`: level 0
    instead of `slide_pixels(width, height, seed)` (e.g. `tumour_slide_pixels`).
    """
    path = Path(path)
    base = slide_pixels(width, height, seed) if pixels is None else pixels
    # Without a spacing: resolution unit NONE, which slide readers take as "unknown".
    pixels_per_cm = 1.0 if mpp is None else 1e4 / mpp
    options = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "zlib",
        "resolutionunit": "NONE" if mpp is None else "CENTIMETER",
    }
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            base,
            subifds=len(DOWNSAMPLES),
            resolution=(pixels_per_cm, pixels_per_cm),
            **options,
        )
        for factor in DOWNSAMPLES:
            tif.write(
                _downsample(base, factor),
                subfiletype=1,
                resolution=(pixels_per_cm / factor, pixels_per_cm / factor),
                **options,
            )
    return path
