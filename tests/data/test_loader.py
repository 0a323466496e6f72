"""The batch loader: order contract, in-memory vs streaming, lazy per-process HDF5, fallbacks,
and the batch-wide normalisation and augmentation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pcam_pipeline.data import loader
from pcam_pipeline.data.loader import (
    Split,
    apply_symmetries,
    augment,
    cgroup_headroom,
    gather,
    normalise,
    symmetry_codes,
)
from pcam_pipeline.data.pcam import PATCH_BYTES
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.params import LoaderParams
from tests.pcam_files import N, stamped_patches, write_processed

BLOCK = 64


def decode(x: torch.Tensor) -> list[int]:
    pixels = x[:, 0, 0, :2].long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


@pytest.fixture
def split_file(tmp_path: Path) -> Path:
    return write_processed(tmp_path / "train.h5")


def options(in_memory: bool, workers: int = 0, block: int = BLOCK) -> LoaderParams:
    return LoaderParams(
        in_memory=in_memory,
        max_memory_fraction=0.5,
        block_patches=block,
        num_workers=workers,
        device_memory_fraction=0.5,
    )


def labels_of(indices: list[int]) -> list[int]:
    return [int(i % 3 == 0) for i in indices]


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_are_uint8_with_the_right_shapes(split_file, in_memory):
    split = Split.open(split_file, options(in_memory))
    assert split.in_memory is in_memory and split.length == N
    batches = list(split.batches(split.epoch_order(torch.Generator().manual_seed(1)), 64))
    assert [len(y) for _, y in batches] == [64] * 4 + [N - 256]
    for x, y in batches:
        assert x.dtype == torch.uint8 and y.dtype == torch.uint8
        assert x.shape == (len(y), 96, 96, 3) and y.shape == (len(y),)
        assert y.tolist() == labels_of(decode(x)), "labels travel with their patches"


@pytest.mark.parametrize("in_memory", [True, False])
def test_epoch_order_is_a_seeded_permutation(split_file, in_memory):
    split = Split.open(split_file, options(in_memory))
    order = split.epoch_order(torch.Generator().manual_seed(5))
    assert sorted(order.tolist()) == list(range(N))
    assert torch.equal(order, split.epoch_order(torch.Generator().manual_seed(5)))
    assert not torch.equal(order, split.epoch_order(torch.Generator().manual_seed(6)))
    visited = [i for x, _ in split.batches(order, 50) for i in decode(x)]
    assert visited == order.tolist(), "batches follow the order exactly"


def test_streaming_order_reads_whole_blocks_one_after_another(split_file):
    split = Split.open(split_file, options(False))
    blocks = (split.epoch_order(torch.Generator().manual_seed(2)) // BLOCK).tolist()
    runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    assert sorted(runs) == list(range(-(-N // BLOCK))), "each block visited in one run"
    assert runs != sorted(runs), "block order is shuffled"


def test_streaming_and_in_memory_hand_out_the_same_patches(split_file):
    memory = Split.open(split_file, options(True))
    stream = Split.open(split_file, options(False))
    # Same order: the same batches, byte for byte.
    order = stream.epoch_order(torch.Generator().manual_seed(3))
    for (xm, ym), (xs, ys) in zip(
        memory.batches(order, 40), stream.batches(order, 40), strict=True
    ):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    # Each with its own epoch order: the same multiset (every patch exactly once).
    for split in (memory, stream):
        seen = [
            i for x, _ in split.batches(split.epoch_order(torch.Generator()), 64) for i in decode(x)
        ]
        assert sorted(seen) == list(range(N))
    with h5py.File(split_file, "r") as handle:
        everything = torch.cat([x for x, _ in stream.batches(torch.arange(N), 128)])
        np.testing.assert_array_equal(everything.numpy(), handle["x"][...])


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("batch_size", [32, 50, 100])
def test_start_batch_skips_exactly_start_batch_times_batch_size(split_file, in_memory, batch_size):
    split = Split.open(split_file, options(in_memory))
    order = split.epoch_order(torch.Generator().manual_seed(4))
    full = [(x.clone(), y.clone()) for x, y in split.batches(order, batch_size)]
    for start in (0, 1, 3, len(full) - 1, len(full), len(full) + 2):
        resumed = list(split.batches(order, batch_size, start))
        assert len(resumed) == max(len(full) - start, 0)
        for (xa, ya), (xb, yb) in zip(full[start:], resumed, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        positions = order[start * batch_size :].tolist()
        assert [i for x, _ in resumed for i in decode(x)] == positions


def test_workers_open_the_file_lazily_each_in_its_own_process(split_file, tmp_path, monkeypatch):
    log_file = tmp_path / "opens.log"

    class RecordingBlocks(PatchBlocks):
        def __init__(self, path: Path, key: str = "x") -> None:
            with open(log_file, "a") as handle:
                handle.write(f"{os.getpid()}\n")
            super().__init__(path, key)

    monkeypatch.setattr(loader, "PatchBlocks", RecordingBlocks)
    split = Split.open(split_file, options(False, workers=2))
    order = split.epoch_order(torch.Generator().manual_seed(8))
    log_file.write_text("")
    got = [(x.clone(), y.clone()) for x, y in split.batches(order, 64)]
    opened = [int(line) for line in log_file.read_text().split()]
    assert len(opened) == 2, "one open per worker, none per item"
    assert len(set(opened)) == 2 and os.getpid() not in opened, "opened in the workers"
    expected = list(Split.open(split_file, options(False)).batches(order, 64))
    for (xa, ya), (xb, yb) in zip(got, expected, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_stopped_epoch_closes_its_file_and_read_errors_surface(split_file, monkeypatch):
    events = []

    class TrackedBlocks(PatchBlocks):
        def __init__(self, path: Path, key: str = "x") -> None:
            events.append("open")
            super().__init__(path, key)

        def close(self) -> None:
            events.append("close")
            super().close()

    monkeypatch.setattr(loader, "PatchBlocks", TrackedBlocks)
    split = Split.open(split_file, options(False))
    batches = split.batches(split.epoch_order(torch.Generator().manual_seed(1)), 16)
    next(batches)
    assert events == ["open"], "opened on first read, once"
    batches.close()  # a run stopped mid-epoch (preemption) leaves no open file behind
    assert events == ["open", "close"]

    calls = []
    real = TrackedBlocks.read_scattered

    def failing(self, out, start, stop, destination):
        calls.append(start)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(self, out, start, stop, destination)

    monkeypatch.setattr(TrackedBlocks, "read_scattered", failing)
    with pytest.raises(OSError, match="disk went away"):
        list(split.batches(split.epoch_order(torch.Generator()), 16))
    assert events[-1] == "close"


def test_falls_back_to_streaming_when_the_split_does_not_fit(split_file, monkeypatch, caplog):
    monkeypatch.setattr(loader, "available_memory", lambda: (N * PATCH_BYTES, "test budget"))
    with caplog.at_level(logging.WARNING):
        split = Split.open(split_file, options(True))  # needs all of it, may use half
    assert not split.in_memory
    assert "does not fit" in split.note and "test budget" in split.note
    assert "loader.max_memory_fraction" in caplog.text and "streaming" in caplog.text
    seen = [
        i for x, _ in split.batches(split.epoch_order(torch.Generator()), 64) for i in decode(x)
    ]
    assert sorted(seen) == list(range(N))
    monkeypatch.setattr(loader, "available_memory", lambda: (10 * N * PATCH_BYTES, "test"))
    assert Split.open(split_file, options(True)).in_memory


def test_misaligned_blocks_are_reported(split_file, caplog):
    with caplog.at_level(logging.WARNING):
        Split.open(split_file, options(False, block=48))  # chunk is 32 patches
    assert "not a multiple of the file's HDF5 chunk" in caplog.text


def test_cgroup_headroom_v1_and_v2(tmp_path):
    proc = tmp_path / "cgroup"
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job" / "step").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("1000\n")
    (v1 / "memory" / "job" / "memory.usage_in_bytes").write_text("700\n")
    (v1 / "memory" / "job" / "memory.stat").write_text("cache 300\ntotal_inactive_file 100\n")
    (v1 / "memory" / "job" / "step" / "memory.limit_in_bytes").write_text("5000\n")
    (v1 / "memory" / "job" / "step" / "memory.usage_in_bytes").write_text("10\n")
    proc.write_text("5:cpu:/\n4:memory:/job/step\n0::/\n")
    assert cgroup_headroom(proc, v1) == 1000 - (700 - 100), "tightest ancestor wins"

    v2 = tmp_path / "v2"
    (v2 / "slurm" / "job").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "slurm" / "job" / "memory.max").write_text("4096\n")
    (v2 / "slurm" / "job" / "memory.current").write_text("1024\n")
    (v2 / "slurm" / "memory.max").write_text("max\n")
    proc.write_text("0::/slurm/job\n")
    assert cgroup_headroom(proc, v2) == 3072
    (v2 / "slurm" / "job" / "memory.max").write_text("max\n")
    assert cgroup_headroom(proc, v2) is None, "no limit anywhere"
    assert cgroup_headroom(tmp_path / "missing", v2) is None


@pytest.mark.parametrize("chunk,compression", [(32, "none"), (64, "none"), (32, "lzf")])
def test_block_reads_match_hdf5(tmp_path, chunk, compression):
    path = write_processed(tmp_path / "x.h5", chunk=chunk, compression=compression)
    with h5py.File(path, "r") as handle, PatchBlocks(path) as reader:
        assert reader.direct is (compression == "none"), "compressed data goes through h5py"
        for start, stop in [(0, 1), (0, N), (31, 97), (N - 5, N), (64, 128), (7, 7)]:
            np.testing.assert_array_equal(reader.read(start, stop), handle["x"][start:stop])
        with pytest.raises(IndexError, match=r"outside \[0, 300\)"):
            reader.read(290, 301)
    contiguous = tmp_path / "contiguous.h5"
    with h5py.File(contiguous, "w") as handle:
        handle.create_dataset("x", data=stamped_patches(50))
    with PatchBlocks(contiguous) as reader:
        assert reader.direct and reader.chunk_rows is None
        np.testing.assert_array_equal(reader.read(3, 40), stamped_patches(50)[3:40])


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_scattered_reads_put_each_row_in_its_place(tmp_path, compression):
    path = write_processed(tmp_path / "x.h5", chunk=32, compression=compression)
    expected = stamped_patches(N)
    rng = np.random.default_rng(0)
    with PatchBlocks(path) as reader:
        for start, stop in [(0, N), (40, 200), (N - 10, N)]:
            destination = rng.permutation(stop - start)
            destination[::7] = -1  # rows not wanted (a resumed, partly skipped block)
            wanted = destination >= 0
            out = np.zeros((int(wanted.sum()) + 3, 96, 96, 3), dtype=np.uint8)
            destination[wanted] = rng.permutation(int(wanted.sum()))
            reader.read_scattered(out, start, stop, destination)
            rows = np.arange(start, stop)[wanted]
            np.testing.assert_array_equal(out[destination[wanted]], expected[rows])
            assert not out[-3:].any(), "nothing written outside the destinations"
        with pytest.raises(ValueError, match="destinations"):
            reader.read_scattered(np.empty((2, 96, 96, 3), np.uint8), 0, 3, np.array([0, 1, 2]))


def test_streaming_any_order_even_with_repeats(split_file):
    memory = Split.open(split_file, options(True))
    stream = Split.open(split_file, options(False))
    order = torch.tensor([5, 5, 3, 70, 64, 64, 299, 0, 1, 2, 1])
    for (xm, ym), (xs, ys) in zip(memory.batches(order, 4), stream.batches(order, 4), strict=True):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    assert [i for x, _ in stream.batches(order, 4) for i in decode(x)] == order.tolist()


def test_gather_equals_indexing():
    images = stamped_patches(20)
    index = torch.tensor([5, 0, 19, 5, 3])
    assert torch.equal(gather(images, index), torch.from_numpy(images)[index])


# ---------------------------------------------------------------------------------------------
# Normalise and augment


def reference_normalise(x, mean, std, channels_last=False):
    """The straightforward out-of-place form the in-place one must match bit for bit."""
    images = x.permute(0, 3, 1, 2).float().div_(255.0)
    images = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return images.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def reference_augment(images, generator, flip, rot90):
    """Flip, flip, rotate per patch, one patch at a time: the definition."""
    n = images.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=bool)
    flip_w = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=bool)
    turns = torch.randint(0, 4, (n,), generator=generator) if rot90 else torch.zeros(n)
    out = []
    for i in range(n):
        patch = images[i]
        if flip_h[i]:
            patch = patch.flip(1)
        if flip_w[i]:
            patch = patch.flip(2)
        out.append(torch.rot90(patch, int(turns[i]), dims=(1, 2)))
    return torch.stack(out)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalise_is_batch_wide_standardisation(channels_last):
    x = torch.from_numpy(stamped_patches(9))
    mean, std = torch.tensor([0.7, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.15])
    out = normalise(x, mean, std, channels_last)
    expected = reference_normalise(x, mean, std, channels_last)
    assert out.shape == (9, 3, 96, 96) and out.dtype == torch.float32
    assert torch.equal(out, expected), "bit-identical to the out-of-place form"
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    np.testing.assert_allclose(
        out[2, 1].numpy(), (x[2, :, :, 1].numpy() / 255 - 0.5) / 0.25, atol=1e-5
    )


@pytest.mark.parametrize("flip,rot90", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_augment_matches_the_per_patch_definition(flip, rot90, channels_last):
    # The training loop augments the uint8 patches, then normalises; the definition turns the
    # normalised images. The two must agree bit for bit (a symmetry only moves pixels).
    x = torch.from_numpy(stamped_patches(33))
    mean, std = torch.tensor([0.7, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.15])
    images = normalise(x, mean, std, channels_last)
    for seed in range(6):
        got = normalise(
            augment(x, torch.Generator().manual_seed(seed), flip, rot90), mean, std, channels_last
        )
        expected = reference_augment(images, torch.Generator().manual_seed(seed), flip, rot90)
        assert torch.equal(got, expected), seed


def test_symmetry_codes_cover_all_eight_and_apply_as_one_gather():
    codes = symmetry_codes(torch.Generator().manual_seed(0), 4096, True, True)
    assert codes is not None and sorted(codes.unique().tolist()) == list(range(8))
    assert symmetry_codes(torch.Generator(), 5, False, False) is None
    x = torch.from_numpy(stamped_patches(8))
    every = torch.arange(8)
    turned = apply_symmetries(x, every)
    for code in range(8):
        expected = x[code]
        expected = expected.flip(0) if code & 1 else expected
        expected = expected.flip(1) if code & 2 else expected
        expected = expected.transpose(0, 1) if code & 4 else expected
        assert torch.equal(turned[code], expected), code
    assert apply_symmetries(x, None) is x


def test_augment_is_label_free_symmetry():
    images = torch.from_numpy(stamped_patches(16))
    assert torch.equal(augment(images, torch.Generator(), False, False), images)

    def again(x, flip, rot90):  # the same draws every time
        return augment(x, torch.Generator().manual_seed(11), flip, rot90)

    rotated = again(images, False, True)
    assert not torch.equal(rotated, images)
    four = again(again(again(rotated, False, True), False, True), False, True)
    assert torch.equal(four, images), "the same quarter turns four times: identity"
    flipped = again(images, True, False)
    assert torch.equal(again(flipped, True, False), images), "a flip undoes itself"
    both = augment(images, torch.Generator().manual_seed(3), True, True)
    for before, after in zip(images, both, strict=True):
        # Flips and rotations only move pixels: each channel keeps its values.
        for channel in range(3):
            assert torch.equal(
                before[..., channel].flatten().sort().values,
                after[..., channel].flatten().sort().values,
            )
        orbit = [torch.rot90(p, k, (0, 1)) for p in (before, before.flip(1)) for k in range(4)]
        assert any(torch.equal(after, candidate) for candidate in orbit)
