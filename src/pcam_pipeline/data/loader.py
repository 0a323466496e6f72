"""Batch loading for training and evaluation: whole batches, never per-sample Python work.

A split is either held in memory as one uint8 tensor (when it fits) or streamed as contiguous,
chunk-aligned blocks in a seeded block order. Batches stay uint8 until they are on the target
device, where normalisation and histology augmentations (flips, 90-degree rotations) are applied
to the whole batch at once.
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

from pcam_pipeline.params import LoaderParams

log = logging.getLogger(__name__)
PATCH_BYTES = 96 * 96 * 3


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, salt): resuming mid-run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + salt)


class _BlockReader(torch.utils.data.Dataset):
    """Item k = the k-th contiguous block of a split, read in one HDF5 call.

    The file is opened lazily in whichever process reads (each DataLoader worker opens its own
    handle after fork); an h5py handle inherited across fork is not safe to use.
    """

    def __init__(self, path: Path, block: int, length: int) -> None:
        self.path, self.block, self.length = path, block, length
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return -(-self.length // self.block)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = h5py.File(self.path, "r"), os.getpid()
        start, stop = k * self.block, min((k + 1) * self.block, self.length)
        x = torch.from_numpy(self._handle["x"][start:stop])
        y = torch.from_numpy(self._handle["y"][start:stop])
        return x, y, start


@dataclass
class Split:
    """One split of the processed dataset, ready to hand out uint8 batches."""

    path: Path
    length: int
    labels: np.ndarray
    images: torch.Tensor | None  # (N,96,96,3) uint8 when held in memory
    params: LoaderParams

    @classmethod
    def open(cls, path: Path, params: LoaderParams) -> Split:
        with h5py.File(path, "r") as handle:
            length = int(handle["y"].shape[0])
            labels = handle["y"][...]
            needed = length * PATCH_BYTES
            budget = psutil.virtual_memory().available * params.max_memory_fraction
            images = None
            if params.in_memory and needed <= budget:
                images = torch.from_numpy(handle["x"][...])
            elif params.in_memory:
                log.warning(
                    "%s: %.1f GB does not fit in %.0f%% of the %.1f GB available; streaming "
                    "blocks instead (raise loader.max_memory_fraction or free memory)",
                    path, needed / 1e9, params.max_memory_fraction * 100,
                    psutil.virtual_memory().available / 1e9,
                )
        return cls(path, length, labels, images, params)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def epoch_order(self, generator: torch.Generator, weights: np.ndarray | None = None
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

    def batches(self, order: torch.Tensor, batch_size: int, start_batch: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (B,96,96,3) images and uint8 (B,) labels, following `order`, from `start_batch`."""
        labels = torch.from_numpy(self.labels)
        if self.in_memory:
            assert self.images is not None
            for start in range(start_batch * batch_size, len(order), batch_size):
                index = order[start:start + batch_size]
                yield self.images[index], labels[index]
            return
        yield from self._streamed_batches(order, batch_size, start_batch)

    def _streamed_batches(self, order: torch.Tensor, batch_size: int, start_batch: int
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        block = self.params.block_patches
        skip = start_batch * batch_size
        # `order` visits one block after another: find each block's run of positions.
        block_ids = order.div(block, rounding_mode="floor")
        run_starts = [0, *(torch.nonzero(torch.diff(block_ids)).flatten() + 1).tolist()]
        run_ends = [*run_starts[1:], len(order)]
        runs = [(int(block_ids[s]), s, e)
                for s, e in zip(run_starts, run_ends, strict=True) if e > skip]
        loader = torch.utils.data.DataLoader(
            _BlockReader(self.path, block, self.length), batch_size=None,
            sampler=[k for k, _, _ in runs], num_workers=self.params.num_workers,
        )
        carry_x = torch.empty((0, 96, 96, 3), dtype=torch.uint8)
        carry_y = torch.empty((0,), dtype=torch.uint8)
        for (_, begin, end), (x, y, first) in zip(runs, loader, strict=True):
            local = order[max(begin, skip):end] - first
            xs, ys = torch.cat([carry_x, x[local]]), torch.cat([carry_y, y[local]])
            full = len(ys) - len(ys) % batch_size
            for i in range(0, full, batch_size):
                yield xs[i:i + batch_size], ys[i:i + batch_size]
            carry_x, carry_y = xs[full:], ys[full:]
        if len(carry_y):
            yield carry_x, carry_y


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 travels (pinned, non-blocking on CUDA); becomes float only on the device."""
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """(B,96,96,3) uint8 -> (B,3,96,96) float, standardised with the train-split statistics."""
    images = x.permute(0, 3, 1, 2).float().div_(255.0)
    images = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return images.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool, rot90: bool
            ) -> torch.Tensor:
    """Random horizontal/vertical flips and 90-degree rotations, drawn per patch, batch-wide ops.

    Histology has no canonical orientation, so these are label-preserving. The draws come from
    a CPU generator seeded per batch, so the result does not depend on the device.
    """
    n = images.shape[0]
    if flip:
        for dim in (2, 3):
            mask = torch.rand(n, generator=generator) < 0.5
            mask = mask.to(images.device).view(n, 1, 1, 1)
            images = torch.where(mask, images.flip(dim), images)
    if rot90:
        turns = torch.randint(0, 4, (n,), generator=generator).to(images.device)
        rotated = images.clone()
        for k in (1, 2, 3):
            selected = turns == k
            if selected.any():
                rotated[selected] = torch.rot90(images[selected], k, dims=(2, 3))
        images = rotated
    return images
