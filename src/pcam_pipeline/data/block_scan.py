"""One pass over every row of a dataset in blocks, read and worked on in a few threads: the
pass under preprocess's writer (`prepare.py`) and validate's scan (`scan.py`)."""

from __future__ import annotations

import itertools
import os
import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from pcam_pipeline.data.hdf5 import blocks
from pcam_pipeline.data.reader import PatchBlocks

# Past a few threads a block scan is bound by memory bandwidth, not by CPU.
MAX_SCAN_THREADS = 4
T = TypeVar("T")


def scan_threads() -> int:
    """Threads for `scan_blocks`: the CPUs this process may use (a Slurm job's allocation), <= 4."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return max(1, min(MAX_SCAN_THREADS, usable))


def scan_blocks(
    reader: PatchBlocks,
    block_patches: int,
    work: Callable[[np.ndarray, slice], T],
    threads: int | None = None,
    zero_copy: bool = False,
) -> Iterator[tuple[slice, np.ndarray, T]]:
    """Read every row in consecutive blocks and run `work(rows, part)` on each, in `threads`
    threads; yield `(part, rows, result)` in file order.

    Reading (os.preadv) and numpy's loops release the GIL, so a block is read and worked on while
    the caller consumes the one before: one pass over the file at the speed of the slower of the
    two. `rows` is a reused buffer, valid until the next iteration; keep a copy to hold on to it.
    Memory: `threads + 1` blocks.

    `zero_copy`: hand `work` read-only views of the file's pages (`PatchBlocks.view`) where the
    layout allows, instead of copies. In the page cache that saves the copy, the largest cost of
    a scan; from a cold disk it is slower (page faults read less ahead than one large preadv).
    Each view's pages are dropped from the process (`unmap`) once the caller is done with it.
    """
    threads = scan_threads() if threads is None else max(1, threads)
    parts = blocks(reader.length, block_patches)
    shape = (min(block_patches, reader.length), *reader.row_shape)

    def load(part: slice, buffer: np.ndarray) -> np.ndarray:
        rows = reader.view(part.start, part.stop) if zero_copy else None
        return rows if rows is not None else reader.read_into(buffer, part.start, part.stop)

    def done_with(part: slice) -> None:
        if zero_copy:
            reader.unmap(part.start, part.stop)

    if threads == 1:
        buffer = np.empty(shape, dtype=reader.dtype)
        for part in parts:
            rows = load(part, buffer)
            yield part, rows, work(rows, part)
            done_with(part)
        return

    # One buffer per task in flight plus the one the caller holds: never a wait for a buffer.
    free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
    for _ in range(threads + 1):
        free.put(np.empty(shape, dtype=reader.dtype))

    def task(part: slice) -> tuple[np.ndarray, np.ndarray, T]:
        buffer = free.get_nowait()
        try:
            rows = load(part, buffer)
            return buffer, rows, work(rows, part)
        except BaseException:
            free.put(buffer)
            raise

    pending: deque[tuple[slice, Future[tuple[np.ndarray, np.ndarray, T]]]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="scan-blocks") as pool:
        try:
            for part in itertools.islice(parts, threads):
                pending.append((part, pool.submit(task, part)))
            while pending:
                part, future = pending.popleft()
                buffer, rows, result = future.result()
                # While the caller works on this block, threads - 1 are in flight: the caller's
                # own work (preprocess writes every block) takes the remaining core.
                yield part, rows, result
                free.put(buffer)
                done_with(part)
                following = next(parts, None)
                if following is not None:
                    pending.append((following, pool.submit(task, following)))
        finally:
            for _, future in pending:
                future.cancel()
