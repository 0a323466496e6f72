"""Block scans: zero-copy views of the file's pages and the threaded, in-order block pipeline."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.data import hashing
from pcam_pipeline.data.block_scan import scan_blocks, scan_threads
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.data.writers import ContiguousWriter
from tests.pcam_files import N, stamped_patches, write_processed


@pytest.mark.parametrize("chunk,compression", [(32, "none"), (64, "lzf")])
def test_views_are_the_file_bytes_read_only_or_none(tmp_path, chunk, compression):
    path = write_processed(tmp_path / "x.h5", chunk=chunk, compression=compression)
    expected = stamped_patches(N)
    with PatchBlocks(path) as reader:
        view = reader.view(40, 200)
        if compression != "none":
            assert view is None, "compressed chunks cannot be mapped: read them"
            return
        assert view is not None
        np.testing.assert_array_equal(view, expected[40:200])
        assert not view.flags.writeable
        assert reader.view(5, 5) is None
        with pytest.raises(IndexError):
            reader.view(0, N + 1)
        del view


def test_scattered_chunks_have_no_view(tmp_path):
    """Chunks written out of order do not lie one after another: no single view spans them."""
    path = tmp_path / "x.h5"
    x = stamped_patches(96)
    with h5py.File(path, "w") as handle:
        data = handle.create_dataset("x", shape=x.shape, dtype="uint8", chunks=(32, 96, 96, 3))
        data[64:96], data[0:32], data[32:64] = x[64:96], x[0:32], x[32:64]
    with PatchBlocks(path) as reader:
        assert reader.direct
        assert reader.view(0, 96) is None
        whole_chunk = reader.view(64, 96)
        assert whole_chunk is not None
        np.testing.assert_array_equal(whole_chunk, x[64:96])


def test_a_file_shorter_than_hdf5_says_is_not_mapped(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=stamped_patches(20))
    with PatchBlocks(path) as reader:
        assert reader.direct
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - 1000)
        assert reader.view(0, 20) is None, "mapped, it would raise SIGBUS"
        with pytest.raises(OSError, match="short read"):
            reader.read(0, 20)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_scan_blocks_hands_every_block_in_order(tmp_path, threads, zero_copy, compression):
    path = write_processed(tmp_path / "x.h5", chunk=32, compression=compression)
    expected = stamped_patches(N)
    workers: set[str] = set()

    def work(rows: np.ndarray, part: slice) -> int:
        workers.add(threading.current_thread().name)
        np.testing.assert_array_equal(rows, expected[part])
        return int(rows[:, 0, 0, 0].astype(np.int64).sum())

    parts = []
    with PatchBlocks(path) as reader:
        for part, rows, result in scan_blocks(
            reader, 50, work, threads=threads, zero_copy=zero_copy
        ):
            np.testing.assert_array_equal(rows, expected[part])  # valid until the next block
            assert result == int(expected[part][:, 0, 0, 0].astype(np.int64).sum())
            parts.append(part)
    assert parts == [slice(s, min(s + 50, N)) for s in range(0, N, 50)]
    if threads == 1:
        assert workers == {threading.current_thread().name}
    else:
        assert all(name.startswith("scan-blocks") for name in workers)


def test_scan_blocks_raises_a_work_error_and_stops(tmp_path):
    path = write_processed(tmp_path / "x.h5", chunk=32)
    started: list[int] = []

    def work(rows: np.ndarray, part: slice) -> None:
        started.append(part.start)
        if part.start == 100:
            raise ValueError("bad block at 100")

    with PatchBlocks(path) as reader, pytest.raises(ValueError, match="bad block at 100"):
        for _ in scan_blocks(reader, 50, work, threads=2):
            pass
    assert max(started) <= 150, "at most the blocks in flight run past the failure"


def test_scan_blocks_buffers_are_reused_not_leaked(tmp_path):
    """threads + 1 buffers serve any number of blocks (the caller holds one at a time)."""
    path = write_processed(tmp_path / "x.h5", chunk=32)
    buffers: set[int] = set()
    with PatchBlocks(path) as reader:
        for _, rows, _ in scan_blocks(reader, 10, lambda rows, part: None, threads=2):
            buffers.add(rows.__array_interface__["data"][0])
    assert len(buffers) <= 3


def test_scan_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert scan_threads() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert scan_threads() == 4


def test_empty_dataset_scans_nothing(tmp_path: Path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", shape=(0, 96, 96, 3), dtype="uint8")
    with PatchBlocks(path) as reader:
        assert list(scan_blocks(reader, 16, lambda rows, part: None, threads=2)) == []


def test_a_file_system_without_mmap_falls_back_to_reads(tmp_path, monkeypatch):
    path = write_processed(tmp_path / "x.h5", chunk=32)

    def no_mmap(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")  # what mmap(2) says where a file system lacks it

    monkeypatch.setattr("pcam_pipeline.data.reader.mmap.mmap", no_mmap)
    expected = stamped_patches(N)
    with PatchBlocks(path) as reader:
        assert reader.view(0, 10) is None
        for part, rows, _ in scan_blocks(reader, 64, lambda rows, part: None, 2, zero_copy=True):
            np.testing.assert_array_equal(rows, expected[part])


# --- the contiguous layout: written once, in file order, its md5 known when done ---------------


def write_contiguous(path: Path, x: np.ndarray, block: int) -> ContiguousWriter:
    y = (np.arange(len(x)) % 2).astype(np.uint8)
    with ContiguousWriter(path, len(x)) as writer:
        for start in range(0, len(x), block):
            stop = min(start + block, len(x))
            writer.append(x[start:stop], y[start:stop], np.arange(start, stop) * 7)
    return writer


@pytest.mark.parametrize("n, block", [(0, 10), (1, 10), (37, 10), (N, 64), (N, N)])
def test_contiguous_writer_knows_the_md5_of_what_it_wrote(tmp_path, n, block):
    path = tmp_path / "x.h5"
    x = stamped_patches(n)
    writer = write_contiguous(path, x, block)
    assert writer.md5 == hashlib.md5(path.read_bytes()).hexdigest()
    with h5py.File(path, "r") as handle:
        assert handle["x"].chunks is None and handle["x"].shape == (n, 96, 96, 3)
        np.testing.assert_array_equal(handle["x"][...], x)
        np.testing.assert_array_equal(handle["y"][...], np.arange(n) % 2)
        np.testing.assert_array_equal(handle["index"][...], np.arange(n) * 7)
    if n:
        with PatchBlocks(path) as reader:
            assert reader.direct, "one run of bytes: read with one system call per block"
            np.testing.assert_array_equal(reader.read(0, n), x)


def test_contiguous_writer_reads_back_where_hdf5_lays_out_otherwise(tmp_path, monkeypatch):
    """Another HDF5 could place the datasets in another order: the md5 then comes from reading
    the file once, and is still right."""
    real = hashing.HashedWrites

    def out_of_order(fd: int, regions):
        return real(fd, None)

    monkeypatch.setattr("pcam_pipeline.data.writers.HashedWrites", out_of_order)
    path = tmp_path / "x.h5"
    writer = write_contiguous(path, stamped_patches(40), 16)
    assert writer.md5 == hashlib.md5(path.read_bytes()).hexdigest()


def test_contiguous_writer_leaves_nothing_when_short_or_failing(tmp_path):
    path = tmp_path / "x.h5"
    with (
        pytest.raises(ValueError, match="10 patches appended of 12"),
        ContiguousWriter(path, 12) as writer,
    ):
        writer.append(stamped_patches(10), np.zeros(10, np.uint8), np.arange(10))
    with (
        pytest.raises(ValueError, match="13 patches appended, made for 12"),
        ContiguousWriter(path, 12) as writer,
    ):
        writer.append(stamped_patches(13), np.zeros(13, np.uint8), np.arange(13))
    with pytest.raises(RuntimeError, match="boom"), ContiguousWriter(path, 12) as writer:
        writer.append(stamped_patches(4), np.zeros(4, np.uint8), np.arange(4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_in_order_md5_hashes_final_bytes_between_and_after_regions(tmp_path):
    path = tmp_path / "f"
    content = bytearray(os.urandom(5000))
    regions = [(100, 1000), (1500, 2000), (3600, 0), (4000, 600)]
    planned = bytearray(content)
    for offset, size in regions:
        planned[offset : offset + size] = bytes(size)  # not yet written
    path.write_bytes(planned)
    fd = os.open(path, os.O_RDWR)
    try:
        with hashing.HashedWrites(fd, regions) as writes:
            for offset, size in regions:
                for start in range(offset, offset + size, 300):  # in blocks, in file order
                    stop = min(start + 300, offset + size)
                    writes.write(memoryview(bytes(content[start:stop])), start)
            md5 = writes.md5()
    finally:
        os.close(fd)
    assert path.read_bytes() == content
    assert md5 == hashlib.md5(content).hexdigest()


def test_in_order_md5_refuses_what_it_cannot_hash_in_order(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="out of file order or overlapping"):
            hashing.InOrderMD5(fd, [(50, 10), (10, 10)])
        with pytest.raises(ValueError, match="out of file order or overlapping"):
            hashing.InOrderMD5(fd, [(10, 50), (40, 10)])
        md5 = hashing.InOrderMD5(fd, [(10, 10)])
        with pytest.raises(ValueError, match="more bytes than the regions hold"):
            md5.region_bytes(memoryview(bytes(11)))
        with pytest.raises(ValueError, match="never written"):
            hashing.InOrderMD5(fd, [(10, 10)]).hexdigest()
    finally:
        os.close(fd)


def test_copy_hashed_copies_and_knows_the_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "COPY_BLOCK_BYTES", 1000)  # several blocks, a partial last one
    source = tmp_path / "source"
    source.write_bytes(os.urandom(4321))
    assert (
        hashing.copy_hashed(source, tmp_path / "copy")
        == hashlib.md5(source.read_bytes()).hexdigest()
    )
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hashing.copy_hashed(empty, tmp_path / "copy2") == hashlib.md5(b"").hexdigest()
