"""Per-channel mean and standard deviation of uint8 patches, in exact integer arithmetic.

Exact sums make `stats.json` the same bytes on every machine, thread count and block size:
a float accumulator would depend on the order the patches are added in.
"""

from __future__ import annotations

import numpy as np

from pcam_pipeline.data.pcam import PATCH_SHAPE

HEIGHT, WIDTH, CHANNELS = PATCH_SHAPE
SUBBLOCK = 64  # patches converted to float32 at a time: they stay in the CPU cache


def channel_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per patch and channel, the sum of the uint8 pixel values and of their squares: exact,
    (N, 3) int64 each.

    Each patch's rows are summed column by column as a float32 matrix product (BLAS): float32
    holds every integer below 2**24 exactly and a column of 96 squared pixels stays below that
    (96 * 255**2 = 6.2M), so nothing is rounded in any order BLAS adds. The per-patch totals are
    summed in float64 (exact below 2**53). 4x faster than widening to uint64, same numbers.
    """
    n = len(x)
    rows = np.ascontiguousarray(x, dtype=np.uint8).reshape(n, HEIGHT, WIDTH * CHANNELS)
    sums = np.empty((n, CHANNELS), dtype=np.int64)
    squares = np.empty((n, CHANNELS), dtype=np.int64)
    ones = np.ones(HEIGHT, dtype=np.float32)
    for start in range(0, n, SUBBLOCK):
        part = rows[start : start + SUBBLOCK].astype(np.float32)
        stop = start + len(part)
        by_column = (ones @ part).astype(np.float64)  # (k, width x channels)
        sums[start:stop] = by_column.reshape(-1, WIDTH, CHANNELS).sum(axis=1)
        np.multiply(part, part, out=part)
        by_column = (ones @ part).astype(np.float64)
        squares[start:stop] = by_column.reshape(-1, WIDTH, CHANNELS).sum(axis=1)
    return sums, squares


class ChannelStats:
    """Running per-channel sums of uint8 pixels and their squares, in exact integers (uint64 never
    overflows here: 262k patches give sums below 2**48)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = np.zeros(CHANNELS, dtype=np.uint64)
        self.total_sq = np.zeros(CHANNELS, dtype=np.uint64)

    def add(self, sums: np.ndarray, squares: np.ndarray, patches: int) -> None:
        """Add per-patch sums from `channel_sums` (of `patches` patches)."""
        self.count += patches * HEIGHT * WIDTH
        self.total += sums.sum(axis=0).astype(np.uint64)
        self.total_sq += squares.sum(axis=0).astype(np.uint64)

    def update(self, x: np.ndarray) -> None:
        self.add(*channel_sums(x), len(x))

    def result(self) -> dict[str, list[float]]:
        """Mean and std of each channel, on the 0..1 scale `loader.normalise` divides by."""
        mean = self.total.astype(np.float64) / self.count
        std = np.sqrt(np.maximum(self.total_sq.astype(np.float64) / self.count - mean**2, 0.0))
        return {"mean": (mean / 255).tolist(), "std": (std / 255).tolist()}
