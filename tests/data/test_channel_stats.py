"""Exact per-channel statistics of uint8 patches (data/channel_stats.py)."""

import numpy as np

from pcam_pipeline.data.channel_stats import ChannelStats, channel_sums


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8) for n in (3, 5)]
    stats = ChannelStats()
    for block in blocks:
        stats.update(block)
    everything = np.concatenate(blocks).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats.result()["mean"], everything.mean(axis=0))
    np.testing.assert_allclose(stats.result()["std"], everything.std(axis=0), rtol=1e-6)


def test_channel_sums_are_exact_integers():
    """The float32 products are exact: equal to uint64 arithmetic, even for all-255 patches."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (130, 96, 96, 3), dtype=np.uint8)  # > one sub-block, ragged end
    x[7] = 255
    sums, squares = channel_sums(x)
    wide = x.reshape(len(x), -1, 3).astype(np.uint64)
    np.testing.assert_array_equal(sums, wide.sum(axis=1))
    np.testing.assert_array_equal(squares, (wide * wide).sum(axis=1))
    assert squares[7].tolist() == [96 * 96 * 255**2] * 3
