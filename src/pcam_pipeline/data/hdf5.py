"""HDF5 reading and writing: the PCAM layout in, the training layout out, always atomically."""

from __future__ import annotations

import contextlib
import io
import itertools
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from pcam_pipeline.data.hashing import HashedWrites
from pcam_pipeline.data.pcam import LABEL_SHAPE, PATCH_BYTES, PATCH_SHAPE, split_files
from pcam_pipeline.repro import atomic_path, write_failed

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Past a few threads a block scan is bound by memory bandwidth, not by CPU.
MAX_SCAN_THREADS = 4
T = TypeVar("T")


class FailSafeFile(io.RawIOBase):
    """The file under an HDF5 file being written (h5py's `fileobj` driver): a write that fails
    is recorded in `error`, never reported to HDF5.

    HDF5 does not survive a failed write: its close then fails half way (a full disk fails the
    flush of the last chunks) and leaves dataset handles that crash the process (a segmentation
    fault) when Python frees them or HDF5 closes them at exit. Here the first failing write and
    every later one are dropped, so HDF5 closes normally; the writer reports `error` and deletes
    the file. For the training layout (chunked datasets that grow) the bytes are those HDF5's
    own driver writes, checked over sizes, chunk shapes and compressions; for a contiguous
    dataset written at once the two drivers lay the file out differently.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._position = 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += os.fstat(self._fd).st_size
        elif whence == os.SEEK_CUR:
            offset += self._position
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            count = os.preadv(self._fd, [view[got:]], self._position + got)
            if count == 0:
                break
            got += count
        # Past the end (where a write was dropped), zeros: what HDF5's own driver reads there.
        view[got:] = bytes(len(view) - got)
        self._position += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self._fd).st_size - self._position)
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if self.error is None:
            try:
                while len(view):  # h5py ignores a short write (a disk filling up): finish it
                    written = os.pwrite(self._fd, view, self._position)
                    self._position += written
                    view = view[written:]
            except OSError as error:
                self.error = error
        self._position += len(view)
        return size

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as error:
                self.error = error
        return size

    def flush(self) -> None:
        pass  # unbuffered: every write is a system call

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class NewHDF5:
    """A new HDF5 file written under a temporary name, renamed onto `final` when complete.

    A write that fails (a full disk: ENOSPC) leaves HDF5 able to close (`FailSafeFile`); the
    writer raises a PipelineError naming `final`, its file system and `fix` at the next
    `check()` or on closing, and the temporary file is removed.
    """

    def __init__(self, final: Path, fix: str, *, temporary: Path | None = None) -> None:
        """`temporary`: write there and leave the rename to the caller (which renames several
        files together); messages still name `final`."""
        self.final, self.fix = Path(final), fix
        self._reported = False
        self._stack = contextlib.ExitStack()
        try:
            path = temporary or self._stack.enter_context(atomic_path(self.final))
            # Runs after HDF5 and the file are closed, before the rename: a failed write
            # raises here, and the temporary file is removed instead of renamed.
            self._stack.callback(self.check)
            self._raw = self._stack.enter_context(contextlib.closing(FailSafeFile(path)))
            self.file = self._stack.enter_context(h5py.File(self._raw, "w"))
        except BaseException:
            self._stack.close()
            raise

    def check(self) -> None:
        """Raise if a write has failed so far (it names `final`, the file system and the fix);
        once: closing after a failure raised by `check` does not raise it again."""
        if self._raw.error is not None and not self._reported:
            self._reported = True
            raise write_failed(self.final, self._raw.error, self.fix) from None

    def __enter__(self) -> NewHDF5:
        return self

    def __exit__(self, *exc_info: object) -> bool | None:
        return self._stack.__exit__(*exc_info)


def write_pcam_split(directory: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write one split as the two PCAM files (`x`: (N,96,96,3) uint8, `y`: (N,1,1,1) uint8).

    Through HDF5's own driver, not `NewHDF5`: for these contiguous datasets the two lay the
    file out differently, and these bytes are pinned in dvc.lock (fetch checks free space
    before it writes them)."""
    x_path, y_path = split_files(directory, split)
    with atomic_path(x_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("x", data=x)
    with atomic_path(y_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("y", data=y.reshape(-1, *LABEL_SHAPE))


def blocks(length: int, block: int) -> Iterator[slice]:
    for start in range(0, length, block):
        yield slice(start, min(start + block, length))


@dataclass(frozen=True)
class ProcessedLayout:
    """How `x` is stored: `contiguous` (one run of bytes, written once in file order, so the
    writer knows the file's md5 when it is done: `ContiguousWriter`) or `chunked` by
    `chunk_patches` whole patches, optionally compressed (`ProcessedWriter`)."""

    chunk_patches: int
    compression: str  # none | lzf | gzip
    storage: str = "chunked"  # contiguous | chunked

    @property
    def contiguous(self) -> bool:
        return self.storage == "contiguous"

    def dataset_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"chunks": (self.chunk_patches, *PATCH_SHAPE)}
        if self.compression != "none":
            options["compression"] = self.compression
        return options

    def max_file_bytes(self, patches: int) -> int:
        """At most how large a file of `patches` patches is, uncompressed: x (whole chunks when
        chunked: HDF5 stores a partial last chunk full size), y and index, and HDF5's metadata
        (1 MiB covers it: 16 kB for 300 patches, 36 kB for 20,000 when measured)."""
        stored = patches
        if not self.contiguous:
            stored = -(-patches // self.chunk_patches) * self.chunk_patches
        return stored * PATCH_BYTES + patches * (1 + 8) + HDF5_METADATA_BYTES


HDF5_METADATA_BYTES = 1 << 20


class ProcessedWriter:
    """Appends blocks of patches to a training-layout file, renamed into place on close.

    Layout: `x` (N,96,96,3) uint8 chunked by whole patches, `y` (N,) uint8 and `index` (N,) int64
    (each patch's index in the source PCAM split, so a result can be traced to its input). A
    write that fails (a full disk) raises a PipelineError naming the file system and `fix`, and
    nothing is left under `path` (`NewHDF5`).
    """

    def __init__(
        self,
        path: Path,
        layout: ProcessedLayout,
        *,
        temporary: Path | None = None,
        fix: str = "free space there, then run `pcam preprocess` again",
    ) -> None:
        """`temporary`: write there, and leave renaming it onto `path` to the caller."""
        self._out = NewHDF5(path, fix, temporary=temporary)
        self._file = self._out.file
        try:
            self._x = self._file.create_dataset(
                "x",
                shape=(0, *PATCH_SHAPE),
                maxshape=(None, *PATCH_SHAPE),
                dtype="uint8",
                **layout.dataset_options(),
            )
            self._y = self._file.create_dataset("y", shape=(0,), maxshape=(None,), dtype="uint8")
            self._index = self._file.create_dataset(
                "index", shape=(0,), maxshape=(None,), dtype="int64"
            )
        except BaseException as error:
            self._out.__exit__(type(error), error, error.__traceback__)
            raise
        self.count = 0
        self.md5: str | None = None  # never known here: chunks and their index lie interleaved

    def append(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        start, stop = self.count, self.count + len(x)
        for dataset, values in ((self._x, x), (self._y, y), (self._index, index)):
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values
        self.count = stop
        self._out.check()  # a full disk stops the stage now, not after the whole split

    def __enter__(self) -> ProcessedWriter:
        return self

    def __exit__(self, *exc_info: object) -> bool | None:
        return self._out.__exit__(*exc_info)


def _allocated_at_creation() -> h5py.h5p.PropDCID:
    """Contiguous storage placed when the dataset is created, never filled: the bytes are
    reserved in the file and are the writer's to fill."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return plist


class ContiguousWriter:
    """A training-layout file with `x` contiguous, written once and in file order, so that its
    md5 is known when the last patch is written (`md5`), without reading the file back.

    HDF5 writes the superblock, the object headers and (on close) the final metadata wherever
    it likes, so the file's bytes are final in order only if nothing is left to HDF5 after
    the data: the three datasets (`x`, then `y` and `index` after it) are created with their
    storage allocated at once and never filled, HDF5 closes the file, and the writer then fills
    those regions itself, in file order, hashing each block on a second thread while it is
    written (`hashing.HashedWrites`). `count` patches must be appended in all.

    A write that fails (a full disk) raises a PipelineError naming the file system and `fix`,
    and nothing is left under `path`. `temporary`: write there, and leave renaming it onto
    `path` to the caller.
    """

    def __init__(
        self,
        path: Path,
        count: int,
        *,
        temporary: Path | None = None,
        fix: str = "free space there, then run `pcam preprocess` again",
    ) -> None:
        self.final, self.fix, self.capacity = Path(path), fix, count
        self.count = 0
        self.md5: str | None = None
        self._labels = np.empty(count, dtype=np.uint8)
        self._indices = np.empty(count, dtype=np.int64)
        self._stack = contextlib.ExitStack()
        try:
            self._path = temporary or self._stack.enter_context(atomic_path(self.final))
            with NewHDF5(self.final, fix, temporary=self._path) as header:
                datasets = [
                    header.file.create_dataset(name, shape, dtype, dcpl=_allocated_at_creation())
                    for name, shape, dtype in (
                        ("x", (count, *PATCH_SHAPE), "uint8"),
                        ("y", (count,), "uint8"),
                        ("index", (count,), "int64"),
                    )
                ]
                regions = [(d.id.get_offset(), d.id.get_storage_size()) for d in datasets]
            # where the bytes of x, y and index go (None: no storage, for no patches)
            self._offsets = [offset for offset, _ in regions]
            filled = [(offset, size) for offset, size in regions if size]
            # Created in this order, HDF5 places them in it (tests/test_hdf5.py); where another
            # HDF5 does not, the writer reads the file back once for its md5 instead.
            in_order = filled == sorted(filled)
            fd = os.open(self._path, os.O_RDWR)
            self._stack.callback(os.close, fd)
            self._writes = self._stack.enter_context(HashedWrites(fd, filled if in_order else None))
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise

    def _write(self, data: np.ndarray, offset: int) -> None:
        try:
            self._writes.write(data, offset)
        except OSError as error:
            raise write_failed(self.final, error, self.fix) from None

    def append(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        start, stop = self.count, self.count + len(x)
        if stop > self.capacity:
            raise ValueError(f"{self.final}: {stop} patches appended, made for {self.capacity}")
        if stop == start:
            return
        self._write(x, self._offsets[0] + start * PATCH_BYTES)
        self._labels[start:stop] = y
        self._indices[start:stop] = index
        self.count = stop

    def _finish(self) -> None:
        if self.count != self.capacity:
            raise ValueError(f"{self.final}: {self.count} patches appended of {self.capacity}")
        if self.capacity:
            self._write(self._labels, self._offsets[1])
            self._write(self._indices, self._offsets[2])
        self.md5 = self._writes.md5()

    def __enter__(self) -> ContiguousWriter:
        return self

    def __exit__(self, *exc_info: object) -> bool | None:
        if exc_info[0] is None:
            try:
                self._finish()
            except BaseException as error:
                # the temporary file goes with the writer's stack, then the error is raised
                if not self._stack.__exit__(type(error), error, error.__traceback__):
                    raise
                return None
        return self._stack.__exit__(*exc_info)


def open_writer(
    path: Path, layout: ProcessedLayout, count: int, *, temporary: Path | None, fix: str
) -> ContiguousWriter | ProcessedWriter:
    """The writer of `layout` for a file of `count` patches; `md5` holds the file's md5 after
    closing where the layout lets the writer know it (contiguous), else None."""
    if layout.contiguous:
        return ContiguousWriter(path, count, temporary=temporary, fix=fix)
    return ProcessedWriter(path, layout, temporary=temporary, fix=fix)


def processed_labels(path: Path) -> np.ndarray:
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
