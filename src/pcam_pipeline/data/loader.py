"""Batch loading for training and evaluation: whole batches, never per-sample Python work.

A split is either held in memory as one uint8 tensor (when it fits the memory budget: the
memory available now, capped by the job's cgroup limit, times `loader.max_memory_fraction`) or
streamed as contiguous, chunk-aligned blocks in a seeded block order. Batches stay uint8 until
they are on the target device (pinned, non-blocking copy on CUDA), where normalisation and the
histology augmentations (flips, 90-degree rotations) are applied to the whole batch at once.

The order contract that resumable training relies on: `Split.epoch_order(generator, weights)`
is a function of the generator's state (and the split's length and block size) only, and
`Split.batches(order, batch_size, start_batch)` yields `order[i * batch_size:(i + 1) *
batch_size]` for i = start_batch, start_batch + 1, ... - in memory and streaming alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch

from pcam_pipeline.data.hdf5 import PatchBlocks
from pcam_pipeline.params import LoaderParams

log = logging.getLogger(__name__)
PATCH_SHAPE = (96, 96, 3)
PATCH_BYTES = 96 * 96 * 3
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, salt): resuming mid-run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + salt)


# ---------------------------------------------------------------------------------------------
# Memory budget


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return None if text in ("", "max") else int(text)
    except (OSError, ValueError):
        return None


def _inactive_file(stat_file: Path, key: str) -> int:
    """Reclaimable page cache the cgroup's usage counts (the kernel drops it before OOM)."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's memory cgroup (e.g. Slurm's `--mem`) may still allocate.

    The tightest limit over the cgroup and its ancestors, minus what each uses (page cache that
    can be dropped excluded); None when no limit applies or no cgroup can be read. Handles
    cgroup v1 (the `memory` controller) and v2 (the unified hierarchy, at `root` or
    `root/unified`).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str, str, str]] = []  # (dir, limit, usage, inactive key)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if "memory" in controllers.split(","):
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        elif controllers == "":
            base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
            files = ("memory.max", "memory.current", "inactive_file")
        else:
            continue
        directory = base / relative
        while True:
            candidates.append((directory, *files))
            if directory == base:
                break
            directory = directory.parent
    headroom: int | None = None
    for directory, limit_name, usage_name, inactive_key in candidates:
        limit = _read_int(directory / limit_name)
        if limit is None or limit >= _UNLIMITED:
            continue
        usage = _read_int(directory / usage_name) or 0
        usage -= _inactive_file(directory / "memory.stat", inactive_key)
        room = max(limit - max(usage, 0), 0)
        headroom = room if headroom is None else min(headroom, room)
    return headroom


def available_memory() -> tuple[int, str]:
    """(bytes that may be allocated now, where that figure comes from)."""
    available = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom()
    if headroom is not None and headroom < available:
        return headroom, "the job's cgroup memory limit"
    return available, "the machine's available memory"


# ---------------------------------------------------------------------------------------------
# Streaming reads


def dataset_chunk_patches(dataset: h5py.Dataset) -> int | None:
    """Patches per HDF5 chunk of `x`, or None for a contiguous (unchunked) dataset."""
    return int(dataset.chunks[0]) if dataset.chunks is not None else None


class _BlockReader(torch.utils.data.Dataset):
    """Item k = the k-th contiguous block of a split: one read of whole chunks.

    The file is opened lazily in whichever process reads (each DataLoader worker opens its own
    handle after fork); an h5py handle or file descriptor inherited across fork is not safe to
    use, so a handle is only used by the process that opened it.
    """

    def __init__(self, path: Path, block: int, labels: np.ndarray) -> None:
        self.path, self.block, self.labels = path, block, labels
        self.length = len(labels)
        self._blocks: PatchBlocks | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return -(-self.length // self.block)

    def _open(self) -> PatchBlocks:
        if self._blocks is None or self._pid != os.getpid():
            self._blocks, self._pid = PatchBlocks(self.path), os.getpid()
        return self._blocks

    def close(self) -> None:
        if self._blocks is not None and self._pid == os.getpid():
            self._blocks.close()
        self._blocks = self._pid = None

    def __getstate__(self) -> dict[str, object]:
        # What a worker receives when the DataLoader pickles it: never an open handle.
        return {**self.__dict__, "_blocks": None, "_pid": None}

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.block, min((k + 1) * self.block, self.length)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        start, stop = self.bounds(k)
        x = self._open().read(start, stop)
        return torch.from_numpy(x), torch.from_numpy(self.labels[start:stop]), start

    def shuffled_blocks(
        self, runs: list[tuple[int, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each (block k, positions within it in visiting order): those patches, in that
        order, read straight into place (no gather copy); and their labels."""
        for k, local in runs:
            start, stop = self.bounds(k)
            positions = local.numpy()
            destination = np.full(stop - start, -1, dtype=np.int64)
            destination[positions] = np.arange(len(positions))
            if np.count_nonzero(destination >= 0) == len(positions):
                x = np.empty((len(positions), *PATCH_SHAPE), dtype=np.uint8)
                self._open().read_scattered(x, start, stop, destination)
            else:  # a patch visited twice in one run: read the block, then gather
                x = np.take(self._open().read(start, stop), positions, axis=0)
            yield torch.from_numpy(x), torch.from_numpy(self.labels[start + positions])


def gather(images: np.ndarray, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of a (N,96,96,3) uint8 array, as a new tensor: the one copy a batch costs.

    numpy's take, not `tensor[index]` (advanced indexing of a 4-d uint8 tensor is ~30x slower)
    nor torch.index_select (an OpenMP parallel region: on a busy machine its spinning worker
    thread competes with the reader and the gather runs 10-40x slower).
    """
    return torch.from_numpy(np.take(images, index.numpy(), axis=0))


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass
class Split:
    """One split of the processed dataset, ready to hand out uint8 batches."""

    path: Path
    length: int
    labels: np.ndarray
    images: torch.Tensor | None  # (N,96,96,3) uint8 when held in memory
    params: LoaderParams
    chunk_patches: int | None = None  # the file's HDF5 chunk, in patches
    note: str = ""  # why the split is streamed when in memory was asked for

    @classmethod
    def open(cls, path: Path, params: LoaderParams) -> Split:
        """Open a processed split: into memory when asked and it fits, else for streaming."""
        with h5py.File(path, "r") as handle:
            x = handle["x"]
            length = int(handle["y"].shape[0])
            labels = handle["y"][...]
            chunk = dataset_chunk_patches(x)
            images, note = None, ""
            if params.in_memory:
                needed = length * PATCH_BYTES
                available, source = available_memory()
                budget = available * params.max_memory_fraction
                if needed <= budget:
                    try:
                        with PatchBlocks(path) as reader:
                            images = torch.from_numpy(reader.read(0, length))
                    except MemoryError:
                        note = (
                            f"{path}: reading {needed / 1e9:.2f} GB into memory failed "
                            "(MemoryError)"
                        )
                else:
                    note = (
                        f"{path}: {needed / 1e9:.2f} GB does not fit in "
                        f"{params.max_memory_fraction:.0%} of {available / 1e9:.2f} GB "
                        f"({source})"
                    )
                if note:
                    log.warning(
                        "%s; streaming %d-patch blocks instead. To hold it in memory, raise "
                        "loader.max_memory_fraction or ask for more memory (Slurm: --mem); to "
                        "silence this, set loader.in_memory: false",
                        note,
                        params.block_patches,
                    )
        split = cls(path, length, labels, images, params, chunk, note)
        if images is None and chunk is not None and params.block_patches % chunk:
            log.warning(
                "%s: loader.block_patches=%d is not a multiple of the file's HDF5 chunk (%d "
                "patches): every block read also reads partial chunks. Set loader.block_patches "
                "to a multiple of %d (preprocess.chunk_patches)",
                path,
                params.block_patches,
                chunk,
                chunk,
            )
        return split

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def epoch_order(
        self, generator: torch.Generator, weights: np.ndarray | None = None
    ) -> torch.Tensor:
        """The visiting order of one epoch.

        In memory: a full permutation (or weighted draws with replacement when `weights` is
        given). Streaming: blocks in shuffled order, each block's patches shuffled, so every
        read stays one contiguous block.
        """
        if weights is not None:
            if not self.in_memory:
                raise ValueError(
                    "train.balanced_sampler needs the split in memory; set loader.in_memory: true "
                    "and raise loader.max_memory_fraction"
                )
            sampler = torch.utils.data.WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double), self.length, generator=generator
            )
            return torch.tensor(list(sampler))
        if self.in_memory:
            return torch.randperm(self.length, generator=generator)
        block = self.params.block_patches
        n_blocks = -(-self.length // block)
        parts = []
        for k in torch.randperm(n_blocks, generator=generator).tolist():
            size = min(block, self.length - k * block)
            parts.append(k * block + torch.randperm(size, generator=generator))
        return torch.cat(parts)

    def batches(
        self, order: torch.Tensor, batch_size: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B,96,96,3) images and uint8 (B,) labels, following `order`, from `start_batch`.

        Batch i holds the patches `order[i * batch_size:(i + 1) * batch_size]`; the first
        `start_batch * batch_size` positions are skipped without being read.
        """
        labels = torch.from_numpy(self.labels)
        order = order.long()
        if self.in_memory:
            assert self.images is not None
            images = self.images.numpy()
            for start in range(start_batch * batch_size, len(order), batch_size):
                index = order[start : start + batch_size]
                yield gather(images, index), labels[index]
            return
        yield from self._streamed_batches(order, batch_size, start_batch)

    def _streamed_batches(
        self, order: torch.Tensor, batch_size: int, start_batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        block = self.params.block_patches
        skip = start_batch * batch_size
        if skip >= len(order):
            return
        # `order` visits one block after another: find each block's run of positions.
        block_ids = order.div(block, rounding_mode="floor")
        run_starts = [0, *(torch.nonzero(torch.diff(block_ids)).flatten() + 1).tolist()]
        run_ends = [*run_starts[1:], len(order)]
        runs = [
            (int(block_ids[s]), s, e) for s, e in zip(run_starts, run_ends, strict=True) if e > skip
        ]
        locals_ = [order[max(begin, skip) : end] - k * block for k, begin, end in runs]
        reader = _BlockReader(self.path, block, self.labels)
        if self.params.num_workers == 0:
            # In this process: each block read straight into its shuffled order.
            shuffled = reader.shuffled_blocks(
                [(k, local) for (k, _, _), local in zip(runs, locals_, strict=True)]
            )
        else:
            # Worker processes read whole blocks ahead; the shuffle is one gather here.
            blocks = torch.utils.data.DataLoader(
                reader,
                batch_size=None,
                sampler=[k for k, _, _ in runs],
                num_workers=self.params.num_workers,
            )
            shuffled = (
                (gather(x.numpy(), local), y[local])
                for (x, y, _), local in zip(blocks, locals_, strict=True)
            )
        carry_x: list[torch.Tensor] = []
        carry_y: list[torch.Tensor] = []
        carried = 0
        try:
            for (xs, ys), local in zip(shuffled, locals_, strict=True):
                # Batches are views of the block's patches, already in visiting order.
                i = 0
                if carried:
                    need = min(batch_size - carried, len(local))
                    carry_x.append(xs[:need])
                    carry_y.append(ys[:need])
                    carried += need
                    i = need
                    if carried < batch_size:
                        continue
                    yield torch.cat(carry_x), torch.cat(carry_y)
                    carry_x, carry_y, carried = [], [], 0
                full = i + (len(local) - i) // batch_size * batch_size
                for j in range(i, full, batch_size):
                    yield xs[j : j + batch_size], ys[j : j + batch_size]
                if full < len(local):
                    carry_x, carry_y = [xs[full:]], [ys[full:]]
                    carried = len(local) - full
        finally:
            reader.close()
        if carried:
            yield torch.cat(carry_x), torch.cat(carry_y)


# ---------------------------------------------------------------------------------------------
# On the device: copy, normalise, augment (whole batches)


def to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 travels (pinned, non-blocking on CUDA); becomes float only on the device."""
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        if not y.is_pinned():
            y = y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def normalise(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """(B,96,96,3) uint8 -> (B,3,96,96) float, standardised with the train-split statistics.

    One float allocation, computed in place: ((x / 255) - mean) / std, the same operations in
    the same order as the out-of-place form, so the values are bit-identical to it.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    n, height, width, channels = x.shape
    images = torch.empty(
        (n, channels, height, width),
        dtype=torch.float32,
        device=x.device,
        memory_format=memory_format,
    )
    images.copy_(x.permute(0, 3, 1, 2))
    images.div_(255.0)
    images.sub_(mean.view(1, channels, 1, 1))
    return images.div_(std.view(1, channels, 1, 1))


def augment(
    images: torch.Tensor, generator: torch.Generator, flip: bool, rot90: bool
) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations, drawn per patch, batch-wide ops.

    Histology has no canonical orientation, so these are label-preserving. The draws come from
    a CPU generator seeded per batch, so the result does not depend on the device. Per patch the
    result is rot90(flip_w(flip_h(x)), k); the three steps compose to one of the 8 symmetries of
    the square (a flip of some axes, then maybe a transpose), so each patch is copied once, by
    groups of patches that share a symmetry, with no host-device synchronisation.
    """
    n = images.shape[0]
    flip_h = flip_w = torch.zeros(n, dtype=torch.bool)
    turns = torch.zeros(n, dtype=torch.long)
    if flip:
        flip_h = torch.rand(n, generator=generator) < 0.5  # dim 2
        flip_w = torch.rand(n, generator=generator) < 0.5  # dim 3
    if rot90:
        turns = torch.randint(0, 4, (n,), generator=generator)
    if not (flip or rot90):
        return images
    # torch.rot90(x, k, (2, 3)): k=1 flips dim 3 then transposes, k=2 flips both, k=3 flips
    # dim 2 then transposes. Flips commute, so a patch needs flip(h', w') then transpose(t).
    h = flip_h ^ ((turns == 2) | (turns == 3))
    w = flip_w ^ ((turns == 1) | (turns == 2))
    t = turns % 2 == 1
    code = h.long() + 2 * w.long() + 4 * t.long()
    present = torch.unique(code).tolist()
    if present == [0]:
        return images
    out = torch.empty_like(images)
    for value in present:
        dims = [d for d, bit in ((2, 1), (3, 2)) if value & bit]
        if len(present) == 1:
            index, part = None, images
        else:
            index = torch.nonzero(code == value).flatten().to(images.device)
            part = torch.index_select(images, 0, index)
        if dims:
            part = part.flip(dims)
        if value & 4:
            part = part.transpose(2, 3)
        if index is None:
            out.copy_(part)
        else:
            out.index_copy_(0, index, part)
    return out
