"""The server's batcher and input statistics, in-process: requests that arrive together share a
batch up to the maximum, each caller gets its own rows back, and a failure reaches every caller
of the batch it hit."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pcam_pipeline.serve.batching import Batcher
from pcam_pipeline.serve.metrics import input_statistics


def patches(first: int, count: int) -> np.ndarray:
    """Patches whose first pixel holds their index: the fake model returns it."""
    block = np.zeros((count, 96, 96, 3), dtype=np.uint8)
    block[:, 0, 0, 0] = np.arange(first, first + count)
    return block


class Recorder:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.delay, self.fail = delay, fail

    def __call__(self, block: np.ndarray) -> np.ndarray:
        self.batches.append(len(block))
        time.sleep(self.delay)  # the model's time, on the batcher's thread
        if self.fail:
            raise RuntimeError("model failed")
        return block[:, 0, 0, 0].astype(np.float32)


async def serve(model: Recorder, sizes: list[int], max_batch: int, max_delay: float) -> list:
    queued: list[int] = []
    batcher = Batcher(model, max_batch, max_delay, on_queue=queued.append)
    batcher.start()
    try:
        starts = np.cumsum([0, *sizes[:-1]])
        calls = [batcher.infer(patches(int(s), n)) for s, n in zip(starts, sizes, strict=True)]
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await batcher.stop()
        assert queued[-1] == 0


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = Recorder(delay=0.01)
    sizes = [1] * 20 + [3, 5]
    answers = asyncio.run(serve(model, sizes, max_batch=8, max_delay=0.05))
    start = 0
    for size, answer in zip(sizes, answers, strict=True):
        np.testing.assert_array_equal(answer, np.arange(start, start + size, dtype=np.float32))
        start += size
    assert sum(model.batches) == sum(sizes) and max(model.batches) <= 8
    assert len(model.batches) < len(sizes)  # requests were batched together


def test_a_request_larger_than_the_maximum_runs_alone():
    model = Recorder()
    answers = asyncio.run(serve(model, [2, 12, 2], max_batch=8, max_delay=0.01))
    assert [len(a) for a in answers] == [2, 12, 2]
    assert 12 in model.batches and sum(model.batches) == 16


def test_a_lone_request_waits_at_most_the_delay():
    model = Recorder()
    start = time.perf_counter()
    asyncio.run(serve(model, [1], max_batch=64, max_delay=0.05))
    assert model.batches == [1] and time.perf_counter() - start < 2


def test_a_failed_batch_reaches_every_caller_and_the_batcher_goes_on():
    model = Recorder(fail=True)
    answers = asyncio.run(serve(model, [1, 1, 1], max_batch=8, max_delay=0.05))
    assert all(isinstance(a, RuntimeError) for a in answers)


@pytest.mark.parametrize(
    ("fill", "blank"),
    [((255, 255, 255), 1.0), ((240, 240, 238), 1.0), ((200, 80, 160), 0.0)],
)
def test_input_statistics_read_channel_means_and_blank_patches(fill, blank):
    block = np.empty((4, 96, 96, 3), dtype=np.uint8)
    block[:] = fill
    means, fraction = input_statistics(block)
    np.testing.assert_allclose(means, fill)
    assert fraction == blank


def test_half_blank_requests_say_half():
    block = np.empty((2, 96, 96, 3), dtype=np.uint8)
    block[0], block[1] = (250, 250, 250), (190, 60, 170)
    assert input_statistics(block)[1] == 0.5
