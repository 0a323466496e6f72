"""One PCAM split made training-ready: clipped, cast, blank patches dropped, written in the
training layout (`writers.ProcessedWriter`), streaming in blocks so memory stays bounded for the
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

from pcam_pipeline.data.block_scan import scan_blocks
from pcam_pipeline.data.channel_stats import ChannelStats, channel_sums
from pcam_pipeline.data.pcam import SPLITS, blank_mask, split_files
from pcam_pipeline.data.processed import STATS_SPLIT, ProcessedData
from pcam_pipeline.data.reader import PatchBlocks
from pcam_pipeline.data.writers import ProcessedLayout, open_writer
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
    layout = processed_layout(params)
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


@dataclass(frozen=True)
class SplitPlan:
    """What preprocess keeps of a split and why, decided before anything is written."""

    source: SplitSource
    labels: np.ndarray  # every patch's label
    keep: np.ndarray  # bool, per patch: not dropped as blank
    cast_from: str | None  # the dtype of wider pixels, cast to uint8
    clipped: int  # patches with a pixel outside [0, 255]

    def record(self) -> dict[str, Any]:
        """The split's entry in reports/preprocess.json."""
        blank = np.flatnonzero(~self.keep).tolist()
        return {
            "source": str(self.source.x_path),
            "cast_from": self.cast_from,
            "clipped": self.clipped,
            "n_in": len(self.keep),
            "n_out": int(self.keep.sum()),
            "blank_removed": len(blank),
            "blank_indices": blank,
        }


def plan_split(
    source: SplitSource,
    params: PreprocessParams,
    checks: ValidateParams,
    stats: ChannelStats | None,
) -> SplitPlan:
    """The first pass over a split: which patches to keep, and (`stats`) the channel sums of
    those kept. Reading and checking blocks runs in worker threads (`scan_blocks`). Raises if
    what is kept cannot be trained or scored on (`check_kept`), before anything is written."""
    labels = read_labels(source)
    with PatchBlocks(source.x_path, "x") as reader:
        if reader.length != len(labels):
            raise PipelineError(
                f"{source.y_path}: {len(labels)} labels for {reader.length} patches in "
                f"{source.x_path}; run `dvc repro validate` to see what is wrong with the split"
            )
        cast_from = None if reader.dtype == np.uint8 else str(reader.dtype)
        keep = np.ones(reader.length, dtype=bool)
        clipped = 0

        def prepare(raw: np.ndarray, _: slice) -> PreparedBlock:
            return prepare_block(raw, params.drop_blank, checks, stats is not None)

        for part, _, block in scan_blocks(reader, params.block_patches, prepare, zero_copy=True):
            keep[part] = block.keep
            clipped += block.clipped
            if stats is not None and block.sums is not None and block.squares is not None:
                stats.add(block.sums, block.squares, len(block.patches))
    check_kept(source, len(labels), labels[keep], checks)
    return SplitPlan(source, labels, keep, cast_from, clipped)


def write_split(
    plan: SplitPlan, layout: ProcessedLayout, block_patches: int, temporary: Path | None
) -> str | None:
    """The second pass: the kept patches of `plan`, uint8, into its target in `layout` (at
    `temporary` if given, renamed by the caller). Returns the file's md5 where the layout lets
    the writer know it as it writes (contiguous), else None."""
    source = plan.source

    def kept(raw: np.ndarray, part: slice) -> np.ndarray:
        block, keep = to_uint8(raw), plan.keep[part]
        return block if keep.all() else block[keep]  # boolean indexing copies: only if needed

    with (
        PatchBlocks(source.x_path, "x") as reader,
        open_writer(
            source.target, layout, int(plan.keep.sum()), temporary=temporary, fix=SPACE_FIX
        ) as writer,
    ):
        for part, _, patches in scan_blocks(reader, block_patches, kept, zero_copy=True):
            keep = plan.keep[part]
            index = np.arange(part.start, part.stop)[keep]
            writer.append(patches, plan.labels[part][keep], index)
    return writer.md5


def processed_layout(params: PreprocessParams) -> ProcessedLayout:
    return ProcessedLayout(params.chunk_patches, params.compression, params.layout)


@dataclass(frozen=True)
class ProcessedResult:
    report: dict[str, Any]  # per split: what was removed and why (reports/preprocess.json)
    md5s: dict[Path, str]  # each file whose md5 the writer knows (contiguous), by final path


def write_processed(
    dataset: ProcessedData, source: Path, params: PreprocessParams, checks: ValidateParams
) -> ProcessedResult:
    """Every split of the PCAM-format directory `source`, made training-ready, into `dataset`,
    with the train split's statistics.

    Two passes: every split is planned first (`plan_split`: what to keep, the statistics, the
    checks that can fail), then written (`write_split`); the first pass also reads the split
    into the page cache for the second. Knowing a split's size before writing it lets the
    contiguous layout place every byte in file order and know the file's md5 when done, which
    DVC then takes instead of reading 7 GB back (`dvc_state`).

    All or nothing: free space is checked and every split planned before anything is written,
    each split goes to a temporary name, and all are renamed into place once every one is good.
    A failure in the last split leaves the previous dataset whole (never a new train.h5 beside
    an old valid.h5 and stats.json).
    """
    dataset.root.mkdir(parents=True, exist_ok=True)
    check_free_space(source, dataset.root, params)
    stats = ChannelStats()
    plans = [
        plan_split(
            SplitSource(split, *split_files(source, split), dataset.split_path(split)),
            params,
            checks,
            stats if split == STATS_SPLIT else None,
        )
        for split in SPLITS
    ]
    layout = processed_layout(params)
    md5s: dict[Path, str | None] = {}
    with contextlib.ExitStack() as all_splits:
        for plan in plans:
            target = plan.source.target
            temporary = all_splits.enter_context(atomic_path(target))
            md5s[target] = write_split(plan, layout, params.block_patches, temporary)
            log.info(
                "preprocess %s: %d -> %d patches",
                plan.source.split,
                len(plan.keep),
                int(plan.keep.sum()),
            )
    dataset.write_stats(stats)
    report = {plan.source.split: plan.record() for plan in plans}
    return ProcessedResult(report, {path: md5 for path, md5 in md5s.items() if md5 is not None})
