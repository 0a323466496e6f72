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

import contextlib
import functools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch

from pcam_pipeline.data.pcam import PATCH_BYTES, PATCH_SHAPE
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.params import LoaderParams

log = logging.getLogger(__name__)
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
# Feeding the device


PREFETCH_BATCHES = 3  # streamed to CUDA: batches copied ahead of the one being trained on


class DeviceBatches:
    """A split's batches on the training device, in an epoch's order, never waiting for it.

    - CPU: the split's own uint8 batches (`Split.batches`), unchanged.
    - CUDA, the split in memory and within `loader.device_memory_fraction` of the GPU's free
      memory: the whole uint8 array is copied to the GPU once; each epoch's order (drawn on
      the CPU from the seeded generator, so the same patches in the same order as on the CPU)
      goes over once, and every batch is one gather on the GPU.
    - CUDA otherwise: the split's batches are produced by a background thread into reused
      pinned buffers and copied on a side stream, `PREFETCH_BATCHES` ahead.
    """

    def __init__(self, split: Split, device: torch.device, params: LoaderParams) -> None:
        self.split, self.device = split, device
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.note = ""
        if device.type != "cuda":
            self.mode = "host"
            return
        self.mode = "prefetch"
        if split.images is None:
            self.note = f"{split.path}: streamed from disk ({split.note or 'loader.in_memory'})"
            return
        needed = split.length * PATCH_BYTES
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * params.device_memory_fraction
        if needed > budget:
            self.note = (
                f"{split.path}: {needed / 1e9:.2f} GB does not fit in "
                f"{params.device_memory_fraction:.0%} of the GPU's {free / 1e9:.2f} GB free; "
                "prefetching from host memory instead (raise loader.device_memory_fraction "
                "to hold it on the GPU)"
            )
            log.info("%s", self.note)
            return
        self.images = split.images.to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.mode = "device"

    def batches(
        self, order: torch.Tensor, batch_size: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B,96,96,3) images and uint8 (B,) labels on the device: `Split.batches`'s
        contract (batch i holds `order[i * batch_size:(i + 1) * batch_size]`)."""
        if self.mode == "host":
            yield from self.split.batches(order, batch_size, start_batch)
            return
        if self.mode == "device":
            assert self.images is not None and self.labels is not None
            index = order.long().pin_memory().to(self.device, non_blocking=True)
            labels = self.labels.index_select(0, index)  # the epoch's labels: one gather
            for start in range(start_batch * batch_size, len(order), batch_size):
                rows = index[start : start + batch_size]
                yield self.images.index_select(0, rows), labels[start : start + batch_size]
            return
        yield from CudaPrefetcher(
            self.split.batches(order, batch_size, start_batch), self.device, batch_size
        )


class CudaPrefetcher:
    """Host batches to the GPU ahead of use: a thread fills reused pinned buffers and copies
    each on a side stream; the training stream waits for that copy's event, never the host."""

    def __init__(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        batch_size: int,
        depth: int = PREFETCH_BATCHES,
    ) -> None:
        self.batches, self.device, self.depth = batches, device, depth
        slots = depth + 2  # a slot is refilled only after its copy is done
        self.pinned = [
            (
                torch.empty((batch_size, *PATCH_SHAPE), dtype=torch.uint8).pin_memory(),
                torch.empty(batch_size, dtype=torch.uint8).pin_memory(),
            )
            for _ in range(slots)
        ]
        self.copied: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(device)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            with torch.cuda.device(self.device):
                for i, (x, y) in enumerate(self.batches):
                    if stop.is_set():
                        return
                    slot = i % len(self.pinned)
                    event = self.copied[slot]
                    if event is not None:
                        event.synchronize()
                    host_x, host_y = self.pinned[slot]
                    n = len(x)
                    host_x[:n].copy_(x)
                    host_y[:n].copy_(y)
                    with torch.cuda.stream(self.stream):
                        device_x = host_x[:n].to(self.device, non_blocking=True)
                        device_y = host_y[:n].to(self.device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(self.stream)
                    self.copied[slot] = done
                    while not stop.is_set():
                        try:
                            out.put((device_x, device_y, done), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as error:  # handed to the consumer, raised there
            out.put(error)
            return
        out.put(None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), daemon=True)
        thread.start()
        try:
            compute = torch.cuda.current_stream(self.device)
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, done = item
                compute.wait_event(done)
                # Allocated on the side stream, used on this one: keep the memory until then.
                x.record_stream(compute)
                y.record_stream(compute)
                yield x, y
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)
            thread.join()


# ---------------------------------------------------------------------------------------------
# On the device: copy, normalise, augment (whole batches)


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


def symmetry_codes(
    generator: torch.Generator, n: int, flip: bool, rot90: bool
) -> torch.Tensor | None:
    """For each of `n` patches, which of the 8 symmetries of the square it gets (0..7), drawn
    from the CPU `generator`; None when neither augmentation is on.

    Per patch the augmentation is rot90(flip_w(flip_h(x)), k), with flip_h, flip_w and k drawn
    in that order. The three compose to a flip of some axes followed by maybe a transpose:
    bit 0 flips the rows, bit 1 the columns, bit 2 transposes. Drawn on the CPU, so the result
    does not depend on the device the patches are on.
    """
    if not (flip or rot90):
        return None
    flip_h = flip_w = torch.zeros(n, dtype=torch.bool)
    turns = torch.zeros(n, dtype=torch.long)
    if flip:
        flip_h = torch.rand(n, generator=generator) < 0.5
        flip_w = torch.rand(n, generator=generator) < 0.5
    if rot90:
        turns = torch.randint(0, 4, (n,), generator=generator)
    # torch.rot90(x, k, (2, 3)): k=1 flips the columns then transposes, k=2 flips both, k=3
    # flips the rows then transposes. Flips commute, so a patch needs flip(h', w') then
    # transpose(t).
    h = flip_h ^ ((turns == 2) | (turns == 3))
    w = flip_w ^ ((turns == 1) | (turns == 2))
    t = turns % 2 == 1
    return h.long() + 2 * w.long() + 4 * t.long()


@functools.lru_cache(maxsize=8)
def symmetry_tables(size: int, device: torch.device) -> torch.Tensor:
    """(8, size*size): for each symmetry code, the source pixel of every output pixel."""
    base = torch.arange(size * size).view(size, size)
    tables = []
    for code in range(8):
        table = base.flip(0) if code & 1 else base
        table = table.flip(1) if code & 2 else table
        table = table.t() if code & 4 else table
        tables.append(table.reshape(-1))
    return torch.stack(tables).to(device)


def apply_symmetries(
    x: torch.Tensor, codes: torch.Tensor | None, tables: torch.Tensor | None = None
) -> torch.Tensor:
    """Patch i of a (B,H,W,C) batch (any dtype, any device) under symmetry `codes[i]`.

    One gather with a fixed shape: no per-group loop, no `unique`/`nonzero`, so nothing waits
    for the device, and `torch.compile` sees one static graph. A symmetry only moves pixels,
    so applying it to uint8 patches before normalisation gives the same floats as after.
    """
    if codes is None:
        return x
    n, height, width, channels = x.shape
    if height != width:
        raise ValueError(f"symmetries of the square need square patches, got {height}x{width}")
    if tables is None:  # given by a caller that compiles this (no cache inside the graph)
        tables = symmetry_tables(height, x.device)
    index = tables[codes].unsqueeze(2).expand(n, height * width, channels)
    return torch.gather(x.reshape(n, height * width, channels), 1, index).view(x.shape)


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, rot90: bool) -> torch.Tensor:
    """Random flips and 90-degree rotations of a (B,H,W,C) batch, drawn per patch.

    Histology has no canonical orientation, so these are label-preserving.
    """
    return apply_symmetries(x, symmetry_codes(generator, x.shape[0], flip, rot90))
