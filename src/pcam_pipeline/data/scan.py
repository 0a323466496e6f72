"""What validate reads from the pixels: one threaded pass over a split's `x` in blocks, giving
per-patch minimum, maximum and non-finite flags and a 32-bit hash of each patch's bytes, then
duplicates within a split and patches shared between splits, every one confirmed byte for byte.

The checks that judge these findings are in `checks.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcam_pipeline.data.block_scan import scan_blocks
from pcam_pipeline.data.pcam import SPLITS
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.params import ValidateParams

MAX_LISTED = 20  # indices listed per problem in the report
HASH_SEED = 0x5043414D  # fixed, so a patch's hash is the same in every run and every split
SUBBLOCK = 64  # patches scanned at a time: each pass over them finds them in the CPU cache


def hash_keys(row_bytes: int) -> np.ndarray:
    """One odd 32-bit multiplier per 4-byte word of a patch."""
    if row_bytes % 4:
        raise ValueError(f"patch size {row_bytes} bytes is not a multiple of 4")
    rng = np.random.default_rng(HASH_SEED)
    return rng.integers(0, 2**32, row_bytes // 4, dtype=np.uint32) | np.uint32(1)


def patch_hashes(x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A 32-bit multilinear hash of each patch's bytes: the sum of word * key, modulo 2**32.

    Vectorised, it costs a fifth of SHA-256 per patch. Equal patches always hash equal; a pair of
    unequal ones collides with odds of about 2**-32, and every equal hash is confirmed byte for
    byte before it is reported: a collision costs one re-read, never a false duplicate.
    """
    words = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint32)
    if words.shape[1] != len(keys):
        raise ValueError(f"{words.shape[1]} words per patch for {len(keys)} hash keys")
    hashes = np.empty(len(x), dtype=np.uint32)
    products = np.empty((min(SUBBLOCK, len(x)), len(keys)), dtype=np.uint32)
    for start in range(0, len(x), SUBBLOCK):
        rows = words[start : start + SUBBLOCK]
        np.multiply(rows, keys, out=products[: len(rows)])
        np.sum(
            products[: len(rows)], axis=1, dtype=np.uint32, out=hashes[start : start + len(rows)]
        )
    return hashes


def first_indices(mask: np.ndarray, offset: int = 0) -> list[int]:
    return [int(i) + offset for i in np.flatnonzero(mask)[:MAX_LISTED]]


def add_listed(listed: list[int], mask: np.ndarray, offset: int) -> None:
    """Append the indices where `mask` holds (shifted by `offset`), up to MAX_LISTED in all."""
    listed += first_indices(mask, offset)[: MAX_LISTED - len(listed)]


@dataclass(frozen=True)
class BlockScan:
    """Per-patch findings for one block: minimum, maximum, non-finite flag, hash."""

    low: np.ndarray
    high: np.ndarray
    nonfinite: np.ndarray | None  # None for integer pixels
    hashes: np.ndarray


def scan_block(block: np.ndarray, keys: np.ndarray) -> BlockScan:
    """Every finding of one block, SUBBLOCK patches at a time (three passes, one memory read)."""
    n = len(block)
    flat = block.reshape(n, -1)
    is_float = np.issubdtype(block.dtype, np.floating)
    low, high = np.empty(n, dtype=block.dtype), np.empty(n, dtype=block.dtype)
    nonfinite = np.zeros(n, dtype=bool) if is_float else None
    hashes = np.empty(n, dtype=np.uint32)
    for start in range(0, n, SUBBLOCK):
        stop = min(start + SUBBLOCK, n)
        part = flat[start:stop]
        hashes[start:stop] = patch_hashes(part, keys)
        if nonfinite is not None:
            finite = np.isfinite(part)
            nonfinite[start:stop] = ~finite.all(axis=1)
            part = np.where(finite, part, 0)
        np.min(part, axis=1, out=low[start:stop])
        np.max(part, axis=1, out=high[start:stop])
    return BlockScan(low, high, nonfinite, hashes)


@dataclass
class SplitScan:
    """What one pass over a split's pixels found (indices: the first MAX_LISTED of each kind)."""

    n: int
    blank: list[int] = field(default_factory=list)
    blank_count: int = 0
    nonfinite: list[int] = field(default_factory=list)
    negative: list[int] = field(default_factory=list)
    above_255: list[int] = field(default_factory=list)
    minimum: float = float("inf")
    maximum: float = float("-inf")
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint32))
    duplicates: list[tuple[int, int]] = field(default_factory=list)

    def add(self, part: slice, found: BlockScan, params: ValidateParams) -> None:
        """Fold in the findings of the block `part` (blocks come in file order)."""
        if found.nonfinite is not None:
            add_listed(self.nonfinite, found.nonfinite, part.start)
        low, high = found.low, found.high
        self.minimum = min(self.minimum, float(low.min()))
        self.maximum = max(self.maximum, float(high.max()))
        add_listed(self.negative, low < 0, part.start)
        add_listed(self.above_255, high > 255, part.start)
        blank = (high <= params.black_level) | (low >= params.white_level)
        self.blank_count += int(blank.sum())
        add_listed(self.blank, blank, part.start)
        self.hashes[part] = found.hashes


class CorruptRows(Exception):
    """Patches of a dataset that cannot be read: a corrupt chunk, a file truncated mid-data."""

    def __init__(self, ranges: list[tuple[int, int]], cause: OSError) -> None:
        super().__init__(f"rows {ranges} cannot be read: {cause}")
        self.ranges, self.cause = ranges, cause


def unreadable_rows(reader: PatchBlocks, rows: slice) -> list[tuple[int, int]]:
    """The `[start, stop)` runs of whole chunks overlapping `rows` that fail to read, probed one
    chunk at a time (only once a block failed: it costs one more read of that block)."""
    step = reader.chunk_rows
    if not step:
        return [(rows.start, rows.stop)]
    bad: list[tuple[int, int]] = []
    for lo in range(rows.start // step * step, rows.stop, step):
        hi = min(lo + step, reader.length)
        try:
            reader.read(lo, hi)
        except OSError:
            if bad and bad[-1][1] == lo:
                bad[-1] = (bad[-1][0], hi)
            else:
                bad.append((lo, hi))
    return bad or [(rows.start, rows.stop)]


def scan_pixels(path: Path, params: ValidateParams) -> SplitScan:
    """One pass over the `x` dataset of `path`, block by block in threads (bounded memory).

    Raises CorruptRows, naming the unreadable patches, where a block fails to read.
    """
    with PatchBlocks(path, "x") as reader:
        scan = SplitScan(n=reader.length, hashes=np.empty(reader.length, dtype=np.uint32))
        keys = hash_keys(reader.row_bytes)
        scanned = 0  # blocks come in file order: a failure is in the block starting here
        try:
            for part, _, found in scan_blocks(
                reader, params.block_patches, lambda rows, _: scan_block(rows, keys), zero_copy=True
            ):
                scan.add(part, found, params)
                scanned = part.stop
        except OSError as exc:  # h5py's read of a corrupt chunk, or a short read
            failed = slice(scanned, min(scanned + params.block_patches, reader.length))
            raise CorruptRows(unreadable_rows(reader, failed), exc) from exc
        scan.duplicates = confirmed_duplicates(scan.hashes, reader)
    return scan


def equal_hash_groups(hashes: np.ndarray) -> list[np.ndarray]:
    """Indices (ascending) of each set of two or more patches with the same hash."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(ordered)])
    pairs = zip(starts.tolist(), sizes.tolist(), strict=True)
    return [order[start : start + size] for start, size in pairs if size > 1]


def confirmed_duplicates(hashes: np.ndarray, reader: PatchBlocks) -> list[tuple[int, int]]:
    """(first, later) index pairs of byte-identical patches, in the order of `later`."""
    pairs = []
    for group in equal_hash_groups(hashes):
        first_seen: dict[bytes, int] = {}
        for index in group.tolist():
            first = first_seen.setdefault(reader.read(index, index + 1).tobytes(), index)
            if first != index:
                pairs.append((first, index))
    return sorted(pairs, key=lambda pair: pair[1])


class SplitPatches:
    """The patches and hashes of several splits, for comparing patches across them: each split's
    `x` file is opened, and its hashes indexed, on first use."""

    def __init__(
        self, hashes: dict[str, np.ndarray], files: dict[str, Path], stack: contextlib.ExitStack
    ) -> None:
        self.hashes, self.files, self.stack = hashes, files, stack
        self.readers: dict[str, PatchBlocks] = {}
        self.indices: dict[str, dict[int, list[int]]] = {}

    def patch(self, split: str, index: int) -> bytes:
        if split not in self.readers:
            self.readers[split] = self.stack.enter_context(PatchBlocks(self.files[split], "x"))
        return self.readers[split].read(index, index + 1).tobytes()

    def with_hash(self, split: str, value: int) -> list[int]:
        """The indices of the patches of `split` whose hash is `value`."""
        if split not in self.indices:
            by_hash: dict[int, list[int]] = {}
            for index, hashed in enumerate(self.hashes[split].tolist()):
                by_hash.setdefault(hashed, []).append(index)
            self.indices[split] = by_hash
        return self.indices[split].get(value, [])

    def shared(self, earlier: str, later: str) -> list[int]:
        """Indices in `later` of patches also in `earlier`: equal hashes, confirmed byte for
        byte."""
        hashes = self.hashes[later]
        candidates = np.flatnonzero(np.isin(hashes, self.hashes[earlier]))
        shared = []
        for index in candidates.tolist():
            mine = self.patch(later, index)
            twins = self.with_hash(earlier, int(hashes[index]))
            if any(self.patch(earlier, twin) == mine for twin in twins):
                shared.append(index)
        return shared


def find_leakage(
    hashes: dict[str, np.ndarray], files: dict[str, Path]
) -> dict[tuple[str, str], list[int]]:
    """For each pair of splits, the indices (in the later split) of patches also in the earlier."""
    leaks: dict[tuple[str, str], list[int]] = {}
    names = [s for s in SPLITS if s in hashes]
    with contextlib.ExitStack() as stack:
        patches = SplitPatches(hashes, files, stack)
        for i, earlier in enumerate(names):
            for later in names[i + 1 :]:
                shared = patches.shared(earlier, later)
                if shared:
                    leaks[(earlier, later)] = shared
    return leaks
