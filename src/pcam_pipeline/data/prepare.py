"""One PCAM split made training-ready: clipped, cast, blank patches dropped, written in the
training layout (`hdf5.ProcessedWriter`), streaming in blocks so memory stays bounded for the
full 7 GB train split.

`write_processed` runs it for every split, with the train split's channel statistics: the
whole processed dataset, all or nothing. The checks here make a split that cannot be trained or
scored on, or a disk too small, fail before anything is renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.channel_stats import ChannelStats, channel_sums
from pcam_pipeline.data.hdf5 import PatchBlocks, ProcessedLayout, ProcessedWriter, scan_blocks
from pcam_pipeline.data.pcam import SPLITS, blank_mask, split_files
from pcam_pipeline.data.processed import STATS_SPLIT, ProcessedData
from pcam_pipeline.errors import NoSpace, PipelineError
from pcam_pipeline.params import PreprocessParams, ValidateParams
from pcam_pipeline.repro import atomic_path, human_bytes, require_free_space

log = logging.getLogger(__name__)

SPACE_FIX = (
    "free space there, point data/processed at a larger file system (a symlink), or set "
    "preprocess.compression: lzf to write less"
)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip then cast: 300 becomes 255 and -4 becomes 0, never a wrapped-around 44 or 252."""
    if x.dtype == np.uint8:
        return x
    return np.clip(np.nan_to_num(x, nan=0.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PreparedBlock:
    """One block made training-ready (in a worker thread): the patches to keep, as uint8."""

    patches: np.ndarray
    clipped: int
    blank: np.ndarray
    sums: np.ndarray | None  # per kept patch, for the channel statistics
    squares: np.ndarray | None

    @property
    def keep(self) -> np.ndarray:
        return ~self.blank


def prepare_block(
    raw: np.ndarray, drop_blank: bool, blank_levels: ValidateParams, with_stats: bool
) -> PreparedBlock:
    block = to_uint8(raw)
    clipped = 0
    if raw.dtype != np.uint8:
        clipped = int(((raw < 0) | (raw > 255)).reshape(len(raw), -1).any(axis=1).sum())
    blank = np.zeros(len(block), dtype=bool)
    if drop_blank:
        blank = blank_mask(block, blank_levels.black_level, blank_levels.white_level)
    keep = ~blank
    # Boolean indexing copies: only when something is dropped.
    patches = block if keep.all() else block[keep]
    sums = squares = None
    if with_stats:
        sums, squares = channel_sums(patches)
    return PreparedBlock(patches, clipped, blank, sums, squares)


def source_length(x_path: Path) -> int:
    try:
        with h5py.File(x_path, "r") as handle:
            return int(handle["x"].shape[0])
    except (OSError, KeyError) as exc:
        raise PipelineError(
            f"{x_path}: cannot be read ({exc}); run `dvc repro validate` to see what is wrong "
            "with the split"
        ) from None


def check_free_space(source_dir: Path, target_dir: Path, params: PreprocessParams) -> None:
    """Fail before writing when the splits cannot fit: their size if no patch were dropped (an
    upper bound) against the free space of the file system holding `target_dir`. The old
    files stay until every new one is complete, so they free nothing in the meantime."""
    layout = ProcessedLayout(params.chunk_patches, params.compression)
    needed = sum(
        layout.max_file_bytes(source_length(split_files(source_dir, split)[0])) for split in SPLITS
    )
    try:
        require_free_space(target_dir, needed, SPACE_FIX)
    except NoSpace:
        if params.compression == "none":
            raise
        # Compressed, the size is unknown until written: a warning. A disk that fills up still
        # ends in a clean error with nothing left behind.
        log.warning(
            "%s may not fit: uncompressed it would take up to %s, more than is free there "
            "(%s compression usually saves some)",
            target_dir,
            human_bytes(needed),
            params.compression,
        )


@dataclass(frozen=True)
class SplitSource:
    """Where a split comes from and goes to, for messages: its two PCAM files and its target."""

    split: str
    x_path: Path
    y_path: Path
    target: Path


def check_kept(source: SplitSource, n_in: int, kept: np.ndarray, checks: ValidateParams) -> None:
    """Raise if what preprocess keeps of a split (the labels `kept`) cannot be trained or scored
    on: no patches at all, or (unless validate.allow_single_class, as validate decides) one
    class only."""
    split, target = source.split, source.target
    dropped = n_in - len(kept)
    if not len(kept):
        what = (
            f"all {n_in} patches are blank (all-black or all-white) and were dropped"
            if n_in
            else "the split holds no patches"
        )
        raise PipelineError(
            f"{source.x_path} [{split}]: {what}, which leaves the {split} split empty; {target} "
            "was not written. Fix: check the source (`pcam validate` lists the blank patches in "
            "reports/validate.json), or set preprocess.drop_blank: false to keep them"
        )
    classes = np.unique(kept)
    if len(classes) > 1:
        return
    only = int(classes[0])
    after = f"after dropping {dropped} blank patches, " if dropped else ""
    problem = (
        f"{source.y_path} [{split}]: {after}all {len(kept)} labels are {only} "
        f"({'tumour' if only else 'normal'}): one class only in the split"
    )
    if checks.allow_single_class:
        log.warning("%s (allowed by validate.allow_single_class)", problem)
        return
    raise PipelineError(
        f"{problem}; {target} was not written. Fix: a split needs both classes (AUROC and the "
        "threshold are undefined otherwise): check the source"
        + (", or set preprocess.drop_blank: false" if dropped else "")
        + ", or set validate.allow_single_class: true"
    )


def read_labels(source: SplitSource) -> np.ndarray:
    with h5py.File(source.y_path, "r") as handle:
        return handle["y"][...].reshape(-1).astype(np.uint8)


def process_split(
    source_dir: Path,
    split: str,
    target: Path,
    params: PreprocessParams,
    checks: ValidateParams,
    stats: ChannelStats | None,
    *,
    temporary: Path | None = None,
) -> dict[str, Any]:
    """Stream one PCAM split into `target`: reading and preparing blocks in worker threads while
    this thread writes the one before, in file order. `checks`: the blank levels, and whether a
    split may hold one class. `stats`: add the kept patches to it. `temporary`: write there and
    leave the rename to the caller. Returns what was removed and why."""
    source = SplitSource(split, *split_files(source_dir, split), target)
    layout = ProcessedLayout(params.chunk_patches, params.compression)
    record: dict[str, Any] = {"source": str(source.x_path), "cast_from": None, "clipped": 0}
    blank_indices: list[int] = []
    labels = read_labels(source)
    kept_labels: list[np.ndarray] = []
    with (
        PatchBlocks(source.x_path, "x") as reader,
        ProcessedWriter(target, layout, temporary=temporary, fix=SPACE_FIX) as writer,
    ):
        if reader.length != len(labels):
            raise PipelineError(
                f"{source.y_path}: {len(labels)} labels for {reader.length} patches in "
                f"{source.x_path}; run `dvc repro validate` to see what is wrong with the split"
            )
        if reader.dtype != np.uint8:
            record["cast_from"] = str(reader.dtype)

        def prepare(raw: np.ndarray, _: slice) -> PreparedBlock:
            return prepare_block(raw, params.drop_blank, checks, stats is not None)

        for part, _, block in scan_blocks(reader, params.block_patches, prepare, zero_copy=True):
            record["clipped"] += block.clipped
            blank_indices += (np.flatnonzero(block.blank) + part.start).tolist()
            indices = np.arange(part.start, part.stop)[block.keep]
            kept_labels.append(labels[part][block.keep])
            writer.append(block.patches, kept_labels[-1], indices)
            if stats is not None and block.sums is not None and block.squares is not None:
                stats.add(block.sums, block.squares, len(block.patches))
        record.update(n_in=reader.length, n_out=writer.count)
        kept = np.concatenate(kept_labels) if kept_labels else np.empty(0, np.uint8)
        # Inside the `with`: raising here leaves nothing of the split under `target`.
        check_kept(source, reader.length, kept, checks)
    return {**record, "blank_removed": len(blank_indices), "blank_indices": blank_indices}


def write_processed(
    dataset: ProcessedData, source: Path, params: PreprocessParams, checks: ValidateParams
) -> dict[str, Any]:
    """Every split of the PCAM-format directory `source`, made training-ready, into `dataset`,
    with the train split's statistics; returns what was removed from each split and why.

    All or nothing: free space is checked before anything is written, each split goes to a
    temporary name, and all are renamed into place once every one is good. A failure in the
    last split leaves the previous dataset whole (never a new train.h5 beside an old
    valid.h5 and stats.json).
    """
    dataset.root.mkdir(parents=True, exist_ok=True)
    check_free_space(source, dataset.root, params)
    stats = ChannelStats()
    report = {}
    with contextlib.ExitStack() as all_splits:
        for split in SPLITS:
            target = dataset.split_path(split)
            report[split] = process_split(
                source,
                split,
                target,
                params,
                checks,
                stats if split == STATS_SPLIT else None,
                temporary=all_splits.enter_context(atomic_path(target)),
            )
            log.info(
                "preprocess %s: %d -> %d patches",
                split,
                report[split]["n_in"],
                report[split]["n_out"],
            )
    dataset.write_stats(stats)
    return report
