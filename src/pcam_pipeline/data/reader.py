"""Reading HDF5 datasets: blocks of whole patches by os.preadv (`PatchBlocks`), and a
processed file's labels."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

import h5py
import numpy as np

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def processed_labels(path: Path) -> np.ndarray:
    """The `y` of a training-layout file: all its labels, without reading `x`."""
    with h5py.File(path, "r") as handle:
        return handle["y"][...]


class PatchBlocks:
    """Reads blocks of whole patches `[start, stop)` of one dataset into a caller's buffer.

    An uncompressed dataset that is contiguous, or chunked by whole patches, is read with
    os.preadv at the byte offsets HDF5 reports for its storage: one system call per chunk, none
    of HDF5's per-chunk machinery, the GIL released. That is checked at open (the first and last
    patch must read the same both ways); any other layout (compressed, filtered, partially
    written, a user block, another file driver) is read through h5py's read_direct. Open one per
    process: neither the HDF5 handle nor the file descriptor may cross a fork.
    """

    def __init__(self, path: Path, key: str = "x") -> None:
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        self._data = self._file[key]
        self.length = int(self._data.shape[0])
        self.row_shape = tuple(self._data.shape[1:])
        self.dtype = self._data.dtype
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.chunk_rows = int(self._data.chunks[0]) if self._data.chunks else None
        self._fd: int | None = None
        self._offsets: list[int] | None = None  # chunked: file offset of each chunk
        self._offset: int | None = None  # contiguous: file offset of row 0
        self._map: mmap.mmap | None = None  # made by the first `view`
        self._map_lock = threading.Lock()
        self._mappable = True  # false once mapping failed (a file system without mmap)
        try:
            self.direct = self._plan_direct()
        except (OSError, RuntimeError, ValueError, AttributeError):  # e.g. an older HDF5
            self.direct = False

    def _plan_direct(self) -> bool:
        data, dsid = self._data, self._data.id
        if (
            self.length == 0
            or self._file.driver != "sec2"
            or self._file.userblock_size
            or dsid.get_create_plist().get_nfilters()
            or not self.dtype.isnative
        ):
            return False
        if data.chunks is None:
            self._offset = dsid.get_offset()
            if self._offset is None:
                return False
        else:
            if tuple(data.chunks[1:]) != self.row_shape:
                return False  # chunks must hold whole rows
            assert self.chunk_rows is not None
            n_chunks = -(-self.length // self.chunk_rows)
            offsets: list[int | None] = [None] * n_chunks
            for i in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(i)
                index = info.chunk_offset[0] // self.chunk_rows
                if index < n_chunks and info.size == self.chunk_rows * self.row_bytes:
                    offsets[index] = info.byte_offset
            if any(offset is None for offset in offsets):
                return False  # a chunk never written, or of an unexpected size
            self._offsets = [int(offset) for offset in offsets if offset is not None]
        self._fd = os.open(self.path, os.O_RDONLY)
        last = self.length - 1
        for row in {0, last}:
            by_hdf5 = self._data[row : row + 1]
            direct = np.empty_like(by_hdf5)
            self._pread(direct, row, row + 1)
            if not np.array_equal(direct, by_hdf5):
                os.close(self._fd)
                self._fd = self._offsets = self._offset = None
                return False
        return True

    def _ranges(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(file offset, first row, end row) of each file-contiguous run of rows [start, stop)."""
        if self._offsets is None:
            assert self._offset is not None
            return [(self._offset + start * self.row_bytes, start, stop)]
        assert self.chunk_rows is not None
        ranges: list[tuple[int, int, int]] = []
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            first = chunk * self.chunk_rows
            lo, hi = max(first, start), min(first + self.chunk_rows, stop)
            offset = self._offsets[chunk] + (lo - first) * self.row_bytes
            previous = ranges[-1] if ranges else None
            if previous and previous[0] + (previous[2] - previous[1]) * self.row_bytes == offset:
                # Chunks written one after another lie one after another: one read.
                ranges[-1] = (ranges[-1][0], ranges[-1][1], hi)
            else:
                ranges.append((offset, lo, hi))
        return ranges

    def _preadv(self, buffers: list[memoryview], position: int) -> None:
        """Fill `buffers` in turn from the file bytes at `position` on (short reads resumed)."""
        assert self._fd is not None
        i = 0
        while i < len(buffers):
            got = os.preadv(self._fd, buffers[i : i + IOV_MAX], position)
            if got <= 0:
                raise OSError(
                    f"{self.path}: short read at byte {position} (file truncated while reading?)"
                )
            position += got
            while got:
                size = len(buffers[i])
                if got >= size:
                    got, i = got - size, i + 1
                else:
                    buffers[i], got = buffers[i][got:], 0

    def _pread(self, out: np.ndarray, start: int, stop: int) -> None:
        view = memoryview(out).cast("B")
        for offset, lo, hi in self._ranges(start, stop):
            self._preadv(
                [view[(lo - start) * self.row_bytes : (hi - start) * self.row_bytes]], offset
            )

    def read_into(self, out: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` into `out[:stop - start]` (C-contiguous, the dataset's dtype)."""
        self._check(start, stop)
        target = out[: stop - start]
        if stop == start:
            return target
        if self.direct:
            self._pread(target, start, stop)
        else:
            self._data.read_direct(target, np.s_[start:stop], np.s_[0 : stop - start])
        return target

    def read_scattered(
        self, out: np.ndarray, start: int, stop: int, destination: np.ndarray
    ) -> np.ndarray:
        """Row `start + i` into `out[destination[i]]` (skipped where destination[i] < 0).

        A shuffled read at the cost of a plain one: the file's contiguous bytes go straight to
        their shuffled places (one vectored read, an iovec per row), with no gather copy.
        """
        self._check(start, stop)
        if len(destination) != stop - start or (len(destination) and destination.max() >= len(out)):
            raise ValueError(
                f"{len(destination)} destinations (up to {destination.max()}) for "
                f"{stop - start} rows into {len(out)} places"
            )
        if not self.direct:
            rows = self.read(start, stop)
            keep = destination >= 0
            out[destination[keep]] = rows[keep]
            return out
        view = memoryview(out).cast("B")
        scratch = memoryview(np.empty(self.row_bytes, dtype=np.uint8))
        size = self.row_bytes
        for offset, lo, hi in self._ranges(start, stop):
            buffers = [
                view[d * size : (d + 1) * size] if d >= 0 else scratch
                for d in destination[lo - start : hi - start].tolist()
            ]
            self._preadv(buffers, offset)
        return out

    def view(self, start: int, stop: int) -> np.ndarray | None:
        """Rows `[start, stop)` as a read-only array over the file's pages (a memory map): no
        copy at all. None where they are not one contiguous run of the file (compressed or
        scattered chunks, a layout read through h5py): read them with `read_into` then.

        The map is valid while the reader is open; a file truncated under it raises SIGBUS, as
        every memory-mapped reader does, so do not rewrite a file while it is being scanned.
        """
        self._check(start, stop)
        if not self.direct or stop == start:
            return None
        ranges = self._ranges(start, stop)
        if len(ranges) != 1:
            return None
        offset = ranges[0][0]
        with self._map_lock:
            if self._map is None and self._mappable:
                assert self._fd is not None
                try:
                    self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
                except (OSError, ValueError):
                    self._mappable = False
        if self._map is None:
            return None
        if offset + (stop - start) * self.row_bytes > len(self._map):
            return None  # shorter than HDF5 says: `read_into` reports it as a short read
        count = (stop - start) * (self.row_bytes // self.dtype.itemsize)
        rows = np.frombuffer(self._map, dtype=self.dtype, count=count, offset=offset)
        return rows.reshape(stop - start, *self.row_shape)

    def unmap(self, start: int, stop: int) -> None:
        """Done with the view of rows `[start, stop)`: drop its pages from this process (they
        stay in the page cache). A scan's RSS then stays at the blocks in flight, not the file
        size, which matters where a scheduler counts mapped file pages against a job's memory
        (Slurm's jobacct_gather). A view used again just faults its pages back in."""
        if self._map is None or stop <= start:
            return
        ranges = self._ranges(start, stop)
        if len(ranges) != 1:
            return
        first = ranges[0][0] // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(ranges[0][0] + (stop - start) * self.row_bytes, len(self._map))
        with contextlib.suppress(OSError):  # only a hint: the pages stay correct either way
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.length})")

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.read_into(np.empty((stop - start, *self.row_shape), self.dtype), start, stop)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive: it goes with them
                self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file.close()

    def __enter__(self) -> PatchBlocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
