"""Training on several processes (DDP, gloo on the CPU): `pcam train` with train.devices: 2
starts two workers; twins are bit-identical, a stopped run resumes to the same bytes, and two
workers see the patches one process sees, step by step."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from pcam_pipeline.errors import EXIT_PREEMPTED
from pcam_pipeline.params import LAUNCHED_PARAMS_ENV, launched_params
from pcam_pipeline.train.checkpoint import load_checkpoint
from pcam_pipeline.train.distributed import World, first_host, requested_processes, worker_world
from pcam_pipeline.train.loop import shard_positions
from tests.tiny_pipeline import (
    run_pcam,
    run_until_line,
    small_run_params,
    training_outputs,
    write_params_file,
)

TWO = {"train": {"devices": 2}}
STOP_AT = "epoch 2 batch 3/8 "  # worker 0's debug line after the 3rd of 8 steps of epoch 2


outputs = training_outputs


def train_run(directory: Path, data: Path, params_file: str = "params.yaml", **sections) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_params_file(directory, **sections).rename(directory / params_file)
    result = run_pcam(["--params", params_file, "train"], directory, data, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    (directory / "train.log").write_text(result.stdout)
    return directory


_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def two_worker_run(tiny_data, tmp_path_factory) -> Path:
    if "two" not in _RUNS:
        _RUNS["two"] = train_run(tmp_path_factory.mktemp("two-workers"), tiny_data, **TWO)
    return _RUNS["two"]


def test_two_workers_train_and_twins_are_bit_identical(two_worker_run, tiny_data, tmp_path):
    log = (two_worker_run / "train.log").read_text()
    assert "launching 2 local training workers" in log
    assert "x 2 workers" in log, "the workers formed one process group"
    checkpoint = load_checkpoint(two_worker_run / "models" / "last.pt")
    assert checkpoint["provenance"]["workers"] == 2
    assert checkpoint["data_order"] == "memory/workers:2"
    assert len(checkpoint["worker_rng"]) == 2
    # The twin's params are in another file and there is no params.yaml: its workers train
    # with the params their launcher hands them, and no file is written for them.
    twin = train_run(tmp_path / "twin", tiny_data, params_file="elsewhere.yaml", **TWO)
    assert not (twin / "params.yaml").exists() and not (twin / ".pcam-work").exists()
    first, second = outputs(two_worker_run), outputs(twin)
    assert sorted(first) == sorted(second) and "models/best.pt" in first
    assert [name for name in first if first[name] != second[name]] == []


def test_two_workers_match_one_process_with_the_same_global_batch(
    two_worker_run, tiny_data, tmp_path
):
    one = train_run(tmp_path / "one", tiny_data)
    history = {
        name: load_checkpoint(run / "models" / "last.pt")["progress"]["history"]
        for name, run in (("one", one), ("two", two_worker_run))
    }
    assert len(history["one"]) == len(history["two"]) == 2
    for single, double in zip(history["one"], history["two"], strict=True):
        # Same patches, same augmentations, the same mean-loss update per step; what differs is
        # BatchNorm's statistics (per worker, over half the batch) and float summation order.
        assert single["lr"] == double["lr"]
        for key in ("train_loss", "val_loss"):
            assert double[key] == pytest.approx(single[key], abs=0.05), key
        for key in ("train_accuracy", "val_accuracy", "val_auroc"):
            assert double[key] == pytest.approx(single[key], abs=0.08), key


@pytest.mark.parametrize("length,batch,size", [(256, 32, 2), (250, 32, 2), (2043, 64, 4)])
def test_workers_shard_each_global_batch_of_the_same_order(length, batch, size):
    order = torch.randperm(length, generator=torch.Generator().manual_seed(0))
    shards = [shard_positions(length, batch, World(rank, size, rank)) for rank in range(size)]
    steps = -(-length // batch)
    for rank, (positions, sizes) in enumerate(shards):
        assert len(sizes) == steps
        assert sizes == [min(batch, length - i * batch) for i in range(steps)]
        assert positions.tolist() == sorted(positions.tolist()), rank
    for step in range(steps):
        seen = []
        for positions, _ in shards:
            per_worker = batch // size
            seen += order[positions[step * per_worker : (step + 1) * per_worker]].tolist()
        assert sorted(seen) == sorted(order[step * batch : (step + 1) * batch].tolist()), step


def test_a_last_batch_smaller_than_the_workers_is_dropped():
    positions, sizes = shard_positions(65, 32, World(1, 4, 1))
    assert sizes == [32, 32] and len(positions) == 16


def test_the_global_batch_must_divide_over_the_workers(tiny_data, tmp_path):
    write_params_file(tmp_path, train={"devices": 3, "batch_size": 32})
    result = run_pcam(["train"], tmp_path, tiny_data, timeout=300)
    assert result.returncode != 0
    assert "error: train.batch_size 32 is the global batch and must divide evenly over 3" in (
        result.stdout
    )
    assert "Traceback" not in result.stdout


def test_sigusr1_to_one_worker_stops_all_and_the_rerun_ends_identical(
    two_worker_run, tiny_data, tmp_path
):
    write_params_file(tmp_path, **TWO)
    targets = []

    def signal_worker_1(launcher: subprocess.Popen) -> None:
        workers = psutil.Process(launcher.pid).children()
        ranks = {int(w.environ().get("RANK", -1)): w for w in workers}
        targets.append(ranks[1])  # not the one that writes: the signal must travel
        ranks[1].send_signal(signal.SIGUSR1)

    code, log, _ = run_until_line(["-v", "train"], tmp_path, tiny_data, STOP_AT, signal_worker_1)
    target = targets[0] if targets else None
    assert target is not None, log[-4000:]
    assert code == EXIT_PREEMPTED, log[-4000:]
    saved = load_checkpoint(tmp_path / "models" / "last.pt")
    assert saved["progress"]["epoch"] == 1 and 3 <= saved["progress"]["batch"] < 8
    assert not saved["progress"]["complete"]
    assert len(saved["worker_sums"]) == 2

    resumed = run_pcam(["train"], tmp_path, tiny_data, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from models/last.pt at epoch 2, batch {saved['progress']['batch']}" in (
        resumed.stdout
    )
    whole, again = outputs(two_worker_run), outputs(tmp_path)
    assert [name for name in whole if whole[name] != again[name]] == []


def test_workers_read_the_params_their_launcher_hands_them():
    params = small_run_params(train={"devices": 2, "plateau_patience": 3})
    handed = {LAUNCHED_PARAMS_ENV: json.dumps(params.as_dict())}
    assert launched_params(handed) == params
    assert launched_params({}) is None, "a process no launcher started reads its params file"


def test_worker_roles_come_from_the_launcher_environment():
    assert worker_world({}) is None
    torchrun = {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert worker_world(torchrun) == World(1, 4, 1)
    srun = {"PCAM_DIST": "srun", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert worker_world(srun) == World(5, 8, 1)
    assert requested_processes(3, cuda=False) == 3
    assert requested_processes("auto", cuda=False) == 1
    assert first_host("localhost") == "localhost"
