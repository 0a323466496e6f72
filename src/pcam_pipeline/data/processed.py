"""The processed dataset: the training-ready splits and their channel statistics, named once.

A directory (data/processed, or a node-local copy: `runtime.data_dir`) holds one `<split>.h5`
per split in the training layout (`x`, `y`, `index`: `writers.ContiguousWriter`, or
`writers.ProcessedWriter` for the chunked layout compression needs) and `stats.json`,
the channel mean and std of the train split only, so nothing of valid or test leaks into
training. preprocess writes it (`prepare.write_processed`); train, evaluate, the benchmark and
`bench/` and `perf/` read it through this class. Reading it needs nothing of how it
is written, so a change to the writer re-runs preprocess, not the stages that read its output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcam_pipeline.dvc.state import NOTHING_KNOWN, known_hashes
from pcam_pipeline.repro import md5_file, read_json, write_json

if TYPE_CHECKING:
    import torch

    from pcam_pipeline.data.channel_stats import ChannelStats

STATS_FILE = "stats.json"
# Opening DVC's state takes ~0.35 s, what hashing ~300 MB takes (2-core VM, docs/performance.md)
ASK_DVC_ABOVE_BYTES = 300 << 20
STATS_SPLIT = "train"  # the statistics come from this split alone


def normalisation(
    stats: Mapping[str, Sequence[float]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std of `stats` (stats.json, or a checkpoint's copy) as tensors on
    `device`, as `loader.normalise` takes them."""
    import torch  # here, not above: preprocess writes the dataset without loading torch

    return (torch.tensor(stats["mean"], device=device), torch.tensor(stats["std"], device=device))


@dataclass(frozen=True)
class ProcessedData:
    """The processed dataset in `root`."""

    root: Path

    def split_path(self, split: str) -> Path:
        return self.root / f"{split}.h5"

    @property
    def stats_path(self) -> Path:
        return self.root / STATS_FILE

    def stats(self) -> dict[str, Any]:
        return read_json(self.stats_path)

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The train split's channel mean and std, as tensors on `device`."""
        return normalisation(self.stats(), device)

    def md5s(self, *splits: str) -> dict[str, str]:
        """The md5 of stats.json and of each split's file, keyed by file name (not path: a copy
        of the same files elsewhere has the same md5s). Where the files are large, the md5s DVC
        already holds for them (preprocess told it, or it hashed them) are taken instead of
        reading gigabytes again; asking DVC costs more than hashing a small dataset."""
        files = [self.stats_path, *(self.split_path(split) for split in splits)]
        large = sum(path.stat().st_size for path in files) >= ASK_DVC_ABOVE_BYTES
        with known_hashes(self.root) if large else contextlib.nullcontext(NOTHING_KNOWN) as known:
            return {path.name: known.md5(path) or md5_file(path) for path in files}

    def write_stats(self, stats: ChannelStats) -> None:
        write_json(self.stats_path, {"from": STATS_SPLIT, "pixels": stats.count, **stats.result()})
