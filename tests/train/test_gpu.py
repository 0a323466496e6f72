"""The CUDA path of training: bit-identical twins, resume equality, bf16 and channels_last, a
step that never waits for the device, the three feeders, compile, and OOM as a result.

They need a CUDA GPU: CI has none and skips them (the reason is printed); on a GPU node run
`scripts/gpu-check.sh`, which runs them after the throughput check (`pytest -m gpu`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.errors import Preempted
from pcam_pipeline.params import Params
from pcam_pipeline.train.checkpoint import load_checkpoint
from pcam_pipeline.train.loop import Loop, RunningSums
from pcam_pipeline.train.preemption import StopFlag
from pcam_pipeline.train.run import Trainer, fit
from tests.tiny_pipeline import small_run_params, training_outputs, workdir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (none visible here); run scripts/gpu-check.sh on a GPU node",
    ),
]
CUDA = {"device": "cuda"}


def train_in(directory: Path, data: Path, params: Params) -> Path:
    """The train stage without its dvclive logs (the GPU machine need not have DVC)."""
    with workdir(directory, data), StopFlag() as stop:
        fit(params, stop, lambda row: None)
    return directory


outputs = training_outputs


def test_twin_cuda_runs_are_bit_identical(tiny_data, tmp_path):
    params = small_run_params(train=CUDA)
    first = outputs(train_in(tmp_path / "a", tiny_data, params))
    second = outputs(train_in(tmp_path / "b", tiny_data, params))
    assert sorted(first) == sorted(second) and first
    assert [name for name in first if first[name] != second[name]] == []
    checkpoint = load_checkpoint(tmp_path / "a" / "models" / "last.pt")
    assert checkpoint["provenance"]["device"] == "cuda"


def test_resume_after_sigusr1_equals_an_uninterrupted_cuda_run(tiny_data, tmp_path, monkeypatch):
    params = small_run_params(train=CUDA)
    whole = outputs(train_in(tmp_path / "whole", tiny_data, params))
    run = Loop.run

    def run_then_signal(self, epoch, start_batch, sums, plateau, should_stop):
        steps = [0]

        def stop_after_three() -> bool:
            steps[0] += 1
            if epoch == 1 and steps[0] == 3:
                signal.raise_signal(signal.SIGUSR1)
            return should_stop()

        return run(self, epoch, start_batch, sums, plateau, stop_after_three)

    monkeypatch.setattr(Loop, "run", run_then_signal)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 at epoch 2, batch 3;"):
        train_in(tmp_path / "broken", tiny_data, params)
    monkeypatch.undo()
    train_in(tmp_path / "broken", tiny_data, params)
    resumed = outputs(tmp_path / "broken")
    assert [name for name in whole if whole[name] != resumed[name]] == []


def test_bf16_autocast_and_channels_last_on_cuda(tiny_data, tmp_path):
    with workdir(tmp_path, tiny_data):
        trainer = Trainer(small_run_params(train=CUDA))
    weight = next(trainer.model.parameters())
    assert weight.is_cuda
    conv = trainer.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen: list[torch.dtype] = []
    handle = trainer.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        trainer.loop.run(0, 0, RunningSums(trainer.device), should_stop=lambda: True)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16], "the forward pass ran under bf16 autocast"


def test_the_steady_loop_never_waits_for_the_device(tiny_data, tmp_path):
    """CUDA's sync debug mode turns any host-device synchronisation into an error: after the
    first batch (the epoch's one-off setup) none may happen until the loop stops."""
    with workdir(tmp_path, tiny_data):
        trainer = Trainer(small_run_params(train={**CUDA, "grad_clip": 1.0}))
    calls = [0]

    def strict_after_first() -> bool:
        calls[0] += 1
        if calls[0] == 1:
            torch.cuda.set_sync_debug_mode("error")
        if calls[0] == 6:
            torch.cuda.set_sync_debug_mode("default")
            return True
        return False

    try:
        done = trainer.loop.run(0, 0, RunningSums(trainer.device), should_stop=strict_after_first)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert done == 6


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_device_resident_and_prefetched_batches_match_the_host_ones(tiny_data, fraction):
    params = small_run_params(loader={"device_memory_fraction": fraction})
    split = Split.open(tiny_data / "train.h5", params.loader)
    order = torch.randperm(split.length, generator=torch.Generator().manual_seed(1))
    on_gpu = DeviceBatches(split, torch.device("cuda"), params.loader)
    assert on_gpu.mode == ("device" if fraction else "prefetch")
    host = list(split.batches(order, 48, 1))
    device = list(on_gpu.batches(order, 48, 1))
    assert len(host) == len(device)
    for (hx, hy), (dx, dy) in zip(host, device, strict=True):
        assert dx.is_cuda and torch.equal(hx, dx.cpu()) and torch.equal(hy, dy.cpu())


def test_streamed_split_is_prefetched_to_the_gpu(tiny_data):
    params = small_run_params(loader={"in_memory": False, "block_patches": 64})
    split = Split.open(tiny_data / "train.h5", params.loader)
    on_gpu = DeviceBatches(split, torch.device("cuda"), params.loader)
    assert on_gpu.mode == "prefetch"
    order = split.epoch_order(torch.Generator().manual_seed(2))
    host = list(split.batches(order, 32))
    device = list(on_gpu.batches(order, 32))
    assert all(torch.equal(h[0], d[0].cpu()) for h, d in zip(host, device, strict=True))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_trains_and_twins_agree(tiny_data, tmp_path, mode):
    params = small_run_params(train={**CUDA, "compile": mode, "epochs": 1})
    first = outputs(train_in(tmp_path / "a", tiny_data, params))
    second = outputs(train_in(tmp_path / "b", tiny_data, params))
    history = load_checkpoint(tmp_path / "a" / "models" / "last.pt")["progress"]["history"]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == [], f"compiled ({mode}) twins differ in {differing}"


def test_out_of_memory_at_a_batch_size_is_a_result():
    from pcam_pipeline.bench.throughput import time_model
    from pcam_pipeline.data.pcam import PATCH_BYTES
    from pcam_pipeline.train.loop import prepare_model

    params = small_run_params()
    device = torch.device("cuda")
    train = params.train.model_copy(update={"bf16": True})
    model = prepare_model(train, device)
    free, _ = torch.cuda.mem_get_info()
    huge = int(free // PATCH_BYTES) * 2  # the uint8 batch alone is twice the free memory
    row = time_model(model, train.model_copy(update={"batch_size": huge}), params.benchmark, device)
    assert row.get("oom") == 1, row
    assert "out of memory" in row["error"]
    small = time_model(model, train.model_copy(update={"batch_size": 64}), params.benchmark, device)
    assert small["train_img_s"] > 0 and small["precision"] == "bf16", "usable again after the OOM"


def test_ddp_on_one_gpu_trains_exactly_as_the_plain_loop(tiny_data, tmp_path):
    """DistributedDataParallel (NCCL, a group of one) changes nothing but the wrapper's cost."""
    import os

    import torch.distributed as dist

    from pcam_pipeline.train.distributed import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        states = []
        for ddp in (False, True):
            with workdir(tmp_path, tiny_data):
                trainer = Trainer(small_run_params(train=CUDA))
            params = trainer.tp
            torch.manual_seed(params.seed)
            loop = Loop(
                params,
                trainer.params.loader,
                trainer.train_split,
                trainer.mean,
                trainer.std,
                trainer.device,
                ddp=ddp,
            )
            loop.run(0, 0, RunningSums(trainer.device))
            states.append({k: v.cpu() for k, v in loop.model.state_dict().items()})
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    finally:
        dist.destroy_process_group()
