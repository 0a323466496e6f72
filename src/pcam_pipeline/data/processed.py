"""The processed dataset: the training-ready splits and their channel statistics, named once.

A directory (data/processed, or a node-local copy: `runtime.data_dir`) holds one `<split>.h5`
per split in the training layout (`hdf5.ProcessedWriter`: `x`, `y`, `index`) and `stats.json`,
the channel mean and std of the train split only, so nothing of valid or test leaks into
training. preprocess writes it (`prepare.write_processed`); train, evaluate, the benchmark and
the measurements of `bench/` read it through this class. Reading it needs nothing of how it
is written, so a change to the writer re-runs preprocess, not the stages that read its output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcam_pipeline.repro import md5_file, read_json, write_json

if TYPE_CHECKING:
    import torch

    from pcam_pipeline.data.channel_stats import ChannelStats

STATS_FILE = "stats.json"
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
        of the same files elsewhere has the same md5s)."""
        files = [self.stats_path, *(self.split_path(split) for split in splits)]
        return {path.name: md5_file(path) for path in files}

    def write_stats(self, stats: ChannelStats) -> None:
        write_json(self.stats_path, {"from": STATS_SPLIT, "pixels": stats.count, **stats.result()})
