"""Files written once, in file order, with their md5 computed on the way: no byte read back.

DVC names every file it tracks by its md5. A stage that knows the md5 of what it wrote can
record it in DVC's state (`dvc_state`), and DVC then hashes nothing after the stage. That needs
the md5 of the file's final bytes, in order: `InOrderMD5` takes a file whose bytes are final
except in some regions that are then filled in file order (an HDF5 file whose datasets were
allocated but not written, `writers.ContiguousWriter`; or a whole file being copied), and
`HashedWrites` writes those regions while a second thread hashes each block, so a block costs
the slower of writing and hashing it, not their sum.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

READ_BYTES = 1 << 20  # final bytes between regions (HDF5's metadata: kilobytes) are read back
COPY_BLOCK_BYTES = 16 << 20


class InOrderMD5:
    """The md5 of a file whose bytes are final except in `regions` ((offset, size), in file
    order, not overlapping), which are handed over in file order as they are written."""

    def __init__(self, fd: int, regions: list[tuple[int, int]]) -> None:
        ends = [offset + size for offset, size in regions]
        if any(following < end for end, (following, _) in zip(ends, regions[1:], strict=False)):
            raise ValueError(f"regions out of file order or overlapping: {regions}")
        self._fd = fd
        self._regions = deque((offset, size) for offset, size in regions if size)
        self._digest = hashlib.md5()
        self.position = 0  # bytes hashed so far, from the start of the file

    def _hash_file_bytes(self, stop: int) -> None:
        while self.position < stop:
            data = os.pread(self._fd, min(READ_BYTES, stop - self.position), self.position)
            if not data:
                raise OSError(f"short read at byte {self.position} of a file being hashed")
            self._digest.update(data)
            self.position += len(data)

    def region_bytes(self, data: memoryview) -> None:
        """The next bytes of the regions, in file order."""
        while len(data):
            if not self._regions:
                raise ValueError("more bytes than the regions hold")
            offset, size = self._regions[0]
            self._hash_file_bytes(offset)
            take = min(len(data), offset + size - self.position)
            self._digest.update(data[:take])
            self.position += take
            data = data[take:]
            if self.position == offset + size:
                self._regions.popleft()

    def hexdigest(self) -> str:
        """The md5, once every region is filled: the bytes after the last one are read."""
        if self._regions:
            raise ValueError(f"{len(self._regions)} regions of the file were never written")
        self._hash_file_bytes(os.fstat(self._fd).st_size)
        return self._digest.hexdigest()


class HashedWrites:
    """Writes into the regions of an open file (`fd`), in file order, the file's md5 computed
    meanwhile on a second thread (`md5` once done). With `regions` None the file's bytes are
    not known to be final in order, and its md5 is read back once at the end instead."""

    def __init__(self, fd: int, regions: list[tuple[int, int]] | None) -> None:
        self._fd = fd
        self._md5 = InOrderMD5(fd, regions) if regions is not None else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="md5")

    def write(self, data: np.ndarray | memoryview | bytes, offset: int) -> None:
        """Write `data` at `offset` (the next bytes of the regions). Both the write and the
        hash release the GIL. An OSError (a full disk) propagates."""
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        hashed = self._pool.submit(self._md5.region_bytes, view) if self._md5 else None
        try:
            written = 0
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], offset + written)
        finally:
            if hashed is not None:
                hashed.result()

    def md5(self) -> str:
        if self._md5 is not None:
            return self._md5.hexdigest()
        digest = hashlib.md5()
        position = 0
        while data := os.pread(self._fd, READ_BYTES, position):
            digest.update(data)
            position += len(data)
        return digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> HashedWrites:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def copy_hashed(source: Path, target: Path) -> str:
    """Copy `source` to the new file `target` and return the md5 of the bytes written: one read
    of the source for both the copy and its checksum."""
    size = os.stat(source).st_size
    buffer = np.empty(min(size, COPY_BLOCK_BYTES) or 1, dtype=np.uint8)
    with contextlib.ExitStack() as files:
        reader = files.enter_context(open(source, "rb", buffering=0))
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        files.callback(os.close, fd)
        writes = files.enter_context(HashedWrites(fd, [(0, size)]))
        position = 0
        while count := reader.readinto(buffer):
            writes.write(buffer[:count], position)
            position += count
        if position != size:
            raise OSError(f"{source}: {position} bytes read, {size} expected (changed while read)")
        return writes.md5()
