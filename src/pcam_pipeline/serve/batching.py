"""Batching of concurrent requests: requests queue up while the model runs, and the next batch
takes what has queued, up to `max_batch` patches, waiting at most `max_delay` for more once the
first request is in (Triton's dynamic batcher, with the same two settings as the exported
`config.pbtxt`). One batch runs at a time, on one thread, with all of ONNX Runtime's threads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Pending = tuple[np.ndarray, asyncio.Future]


class Batcher:
    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay: float,
        on_queue: Callable[[int], None] = lambda _: None,
        on_batch: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._infer = infer
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._on_queue = on_queue  # the patches waiting, after each change
        self._on_batch = on_batch  # the patches in each batch run
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._held: Pending | None = None  # taken from the queue, too big for the last batch
        self._queued = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pcam-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pcam-batcher")

    async def stop(self) -> None:
        """After the server has answered every request in flight: nothing is left queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def infer(self, patches: np.ndarray) -> np.ndarray:
        """The probabilities of these patches, computed in whatever batch they join."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((patches, future))
        self._count(len(patches))
        return await future

    def _count(self, change: int) -> None:
        self._queued += change
        self._on_queue(self._queued)

    async def _next(self, timeout: float | None) -> Pending | None:
        if self._held is not None:
            pending, self._held = self._held, None
            return pending
        with contextlib.suppress(asyncio.QueueEmpty):
            return self._queue.get_nowait()
        if timeout is not None and timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first[0])
        deadline = loop.time() + self._max_delay
        while size < self._max_batch:
            pending = await self._next(deadline - loop.time())
            if pending is None:
                break
            if size + len(pending[0]) > self._max_batch:
                self._held = pending  # it starts the next batch
                break
            batch.append(pending)
            size += len(pending[0])
        self._count(-size)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._collect() if not p[1].done()]  # callers gone: skip
            if not batch:
                continue
            patches = np.concatenate([p[0] for p in batch]) if len(batch) > 1 else batch[0][0]
            self._on_batch(len(patches))
            try:
                probabilities = await loop.run_in_executor(self._executor, self._infer, patches)
            except Exception as exc:  # the model failed on the batch: every caller hears of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for part, future in batch:
                if not future.done():
                    future.set_result(probabilities[start : start + len(part)])
                start += len(part)
