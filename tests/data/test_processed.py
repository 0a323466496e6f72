"""The processed dataset's owner (data/processed.py): where its files are, what stats.json holds,
and the same statistics as the tensors training normalises with."""

import hashlib
import json

import numpy as np
import torch

from pcam_pipeline.data.channel_stats import ChannelStats
from pcam_pipeline.data.processed import ProcessedData, normalisation
from pcam_pipeline.data.writers import ProcessedLayout, ProcessedWriter
from tests.pcam_files import stamped_patches


def test_stats_are_written_read_and_turned_into_tensors(tmp_path):
    dataset = ProcessedData(tmp_path)
    x = stamped_patches(10)
    stats = ChannelStats()
    stats.update(x)
    dataset.write_stats(stats)
    assert dataset.stats_path == tmp_path / "stats.json"
    written = json.loads(dataset.stats_path.read_text())
    assert written == {"from": "train", "pixels": 10 * 96 * 96, **stats.result()}
    mean, std = dataset.normalisation(torch.device("cpu"))
    assert torch.equal(mean, torch.tensor(stats.result()["mean"]))
    assert torch.equal(std, torch.tensor(stats.result()["std"]))
    assert mean.dtype == torch.float32 and mean.shape == (3,)
    # A checkpoint's copy of the statistics gives the same tensors.
    copied = normalisation({"mean": written["mean"], "std": written["std"]}, torch.device("cpu"))
    assert torch.equal(copied[0], mean) and torch.equal(copied[1], std)


def test_md5s_are_keyed_by_file_name_in_a_fixed_order(tmp_path):
    dataset = ProcessedData(tmp_path)
    for split in ("train", "valid"):
        with ProcessedWriter(dataset.split_path(split), ProcessedLayout(8, "none")) as writer:
            writer.append(stamped_patches(4), np.zeros(4, np.uint8), np.arange(4))
    dataset.stats_path.write_text("{}\n")
    md5s = dataset.md5s("train", "valid")
    assert list(md5s) == ["stats.json", "train.h5", "valid.h5"]
    for name, md5 in md5s.items():
        assert md5 == hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    staged = ProcessedData(tmp_path / "copy")
    staged.root.mkdir()
    for name in md5s:
        (staged.root / name).write_bytes((tmp_path / name).read_bytes())
    assert staged.md5s("train", "valid") == md5s, "a copy elsewhere: the same record"
