"""The training layout's HDF5 writers (preprocess): always under a temporary name, a failed
write (a full disk) reported naming the file system and the fix, nothing left behind."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.hashing import HashedWrites
from pcam_pipeline.data.hdf5 import HDF5_METADATA_BYTES
from pcam_pipeline.data.pcam import PATCH_BYTES, PATCH_SHAPE
from pcam_pipeline.repro import atomic_path, write_failed


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
            # Created in this order, HDF5 places them in it (tests/data/test_hdf5.py); where another
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
