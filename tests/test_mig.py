"""The course's GPU is a MIG slice of an A100 (issue 33): detecting a slice from what CUDA,
nvidia-smi and Slurm report (recorded here, no GPU needed), one training worker where several
slices are visible, and the fit check's decision on a batch that does not fit."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pcam_pipeline.data.loader import Split
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.runtime import (
    GIB,
    mig_facts,
    mig_instances_listed,
    mig_profile,
    mig_uuids,
    out_of_memory_error,
)
from pcam_pipeline.train import distributed
from pcam_pipeline.train.distributed import WorkersFailed, mig_processes
from pcam_pipeline.train.loop import Loop, prove_fit
from tests.tiny_pipeline import small_run_params

SLURM = Path(__file__).resolve().parents[1] / "slurm"
COURSE_GPU = "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
UUID_A = "MIG-1f0b8a3e-6c55-5b3a-9e1c-2d7a0c4b9f10"
UUID_B = "MIG-8c2d4e6f-0a1b-5c3d-8e7f-9a0b1c2d3e4f"
# `nvidia-smi -L` on a gpu_course node: one A100 split into 1g.5gb instances.
SMI_L = f"""GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d1b2c3a-4e5f-6a7b-8c9d-0e1f2a3b4c5d)
  MIG 1g.5gb      Device  0: (UUID: {UUID_A})
  MIG 1g.5gb      Device  1: (UUID: {UUID_B})
"""
WHOLE_SMI_L = "GPU 0: NVIDIA H100 (UUID: GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d)\n"


# --- detection --------------------------------------------------------------------------------


def test_the_profile_is_read_from_the_device_name():
    assert mig_profile(COURSE_GPU) == "1g.5gb"
    assert mig_profile("NVIDIA H100 80GB HBM3 MIG 3g.40gb") == "3g.40gb"
    assert mig_profile("NVIDIA A100-SXM4-40GB") is None
    assert mig_profile(None) is None


def test_mig_instances_are_read_from_nvidia_smi_and_cuda_visible_devices():
    assert mig_instances_listed(SMI_L) == [("1g.5gb", UUID_A), ("1g.5gb", UUID_B)]
    assert mig_instances_listed(WHOLE_SMI_L) == []
    assert mig_uuids(f"{UUID_A},{UUID_B}") == [UUID_A, UUID_B]
    assert mig_uuids("0,1") == [] and mig_uuids(None) == []


def test_mig_facts_of_a_slice_two_slices_and_a_whole_gpu():
    one = mig_facts([COURSE_GPU], UUID_A, SMI_L)
    assert one == {"mig": True, "profile": "1g.5gb", "instances": 1}
    # Slurm's --gpus=2 on gpu_course: two UUIDs; CUDA may enumerate only the first.
    two = mig_facts([COURSE_GPU], f"{UUID_A},{UUID_B}")
    assert two == {"mig": True, "profile": "1g.5gb", "instances": 2}
    # The UUIDs alone (a name CUDA did not report): nvidia-smi names the profile.
    assert mig_facts([], UUID_B, SMI_L)["profile"] == "1g.5gb"
    # nvidia-smi alone (no CUDA_VISIBLE_DEVICES): the node's instances.
    assert mig_facts([], None, SMI_L) == {"mig": True, "profile": "1g.5gb", "instances": 2}
    # A whole GPU 0 on a node whose other GPU is split: not a slice.
    assert not mig_facts(["NVIDIA A100-SXM4-40GB"], "0", SMI_L)["mig"]
    assert mig_facts(["NVIDIA A100-SXM4-40GB"], "0", WHOLE_SMI_L) == {
        "mig": False,
        "profile": None,
        "instances": 0,
    }


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SLURM / "gpu-check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_preflight_line_names_the_slice():
    check = load_gpu_check()
    line = check.check_line("2.13.0+cu130", "13.0", "580.82.07", [COURSE_GPU], UUID_A, "")
    assert line.endswith(f"1 GPU(s): {COURSE_GPU}, MIG 1g.5gb")
    line = check.check_line("2.13.0+cu130", "13.0", None, [COURSE_GPU], f"{UUID_A},{UUID_B}", "")
    assert "MIG 1g.5gb x2" in line and "one training worker" in line
    whole = check.check_line("2.13.0+cu130", "13.0", "580", ["NVIDIA H100"], "0", WHOLE_SMI_L)
    assert "MIG" not in whole
    # The patterns are the project's, repeated in the standalone script: they must agree.
    assert (
        check.MIG_PROFILE.pattern == __import__("pcam_pipeline.runtime").runtime.MIG_PROFILE.pattern
    )


# --- one worker per MIG job -------------------------------------------------------------------


def test_several_slices_train_one_worker_and_say_why(caplog):
    facts = mig_facts([COURSE_GPU, COURSE_GPU], f"{UUID_A},{UUID_B}")
    with caplog.at_level(logging.WARNING, logger="pcam_pipeline.train.distributed"):
        assert mig_processes(2, "auto", 1, facts) == 1
    assert "NCCL does not run across MIG instances" in caplog.text
    assert "2 MIG instance(s) (1g.5gb)" in caplog.text
    whole = mig_facts(["NVIDIA H100", "NVIDIA H100"], "0,1")
    assert mig_processes(2, "auto", 1, whole) == 2, "whole GPUs keep one worker each"


@pytest.mark.parametrize(
    ("devices", "tasks", "asked"), [(2, 1, "train.devices: 2"), ("auto", 2, "2 Slurm tasks")]
)
def test_an_explicit_request_for_several_workers_on_slices_is_refused(devices, tasks, asked):
    facts = mig_facts([COURSE_GPU], f"{UUID_A},{UUID_B}")
    with pytest.raises(WorkersFailed) as refused:
        mig_processes(2, devices, tasks, facts)
    message = str(refused.value)
    assert asked in message and "NCCL does not run across MIG instances" in message
    assert "train.devices: 1" in message and "--gpus=1" in message


def test_training_processes_consults_the_gpus_only_for_several_cuda_workers(monkeypatch):
    """`pcam train` on a job with two slices visible (simulated: no GPU here)."""
    facts = {"names": [COURSE_GPU] * 2, **mig_facts([COURSE_GPU] * 2, f"{UUID_A},{UUID_B}")}
    monkeypatch.setattr(distributed, "uses_cuda", lambda params: True)
    monkeypatch.setattr(distributed, "requested_processes", lambda devices, cuda: 2)
    monkeypatch.setattr(distributed, "gpu_record", lambda: facts)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.training_processes(small_run_params().train) == 1
    with pytest.raises(WorkersFailed):
        distributed.training_processes(small_run_params(train={"devices": 2}).train)


# --- fit before training ----------------------------------------------------------------------


def oom_error(free: int | None, total: int | None, detail: str, **overrides) -> PipelineError:
    facts = {
        "batch_size": 512,
        "model": "timm resnet18",
        "compile_mode": "reduce-overhead",
        "free_bytes": free,
        "total_bytes": total,
        "device_name": COURSE_GPU,
        "when": "before the first epoch (nothing was written)",
        "detail": detail,
    }
    return out_of_memory_error(**{**facts, **overrides})


def test_the_out_of_memory_error_names_the_batch_the_model_the_memory_and_the_fix():
    message = str(
        oom_error(
            int(0.31 * GIB), int(4.75 * GIB), "CUDA out of memory. Tried to allocate 1.12 GiB"
        )
    )
    assert "train.batch_size 512" in message and "timm resnet18" in message
    assert "0.31 GiB free of 4.75 GiB" in message and "MIG 1g.5gb slice" in message
    assert "Tried to allocate 1.12 GiB" in message
    assert "smaller train.batch_size (e.g. 256)" in message and "train.compile: off" in message
    assert "before the first epoch (nothing was written)" in message
    plain = str(oom_error(None, None, "", compile_mode="off", device_name="NVIDIA H100"))
    assert "memory unknown" in plain and "train.compile" not in plain.split("Fix:")[1]
    assert "MIG" not in plain


def test_prove_fit_turns_a_simulated_out_of_memory_into_the_error():
    def trial() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen = []

    def error(free, total, detail):
        seen.append((free, total, detail))
        return oom_error(free, total, detail)

    with pytest.raises(PipelineError) as stopped:
        prove_fit(trial, lambda: (1 * GIB, 5 * GIB), error)
    assert seen == [(GIB, 5 * GIB, "CUDA out of memory. Tried to allocate 2.00 GiB")]
    assert stopped.value.__cause__ is None and stopped.value.__suppress_context__
    prove_fit(lambda: None, lambda: pytest.fail("memory read without an OOM"), error)


def cpu_loop(tiny_data: Path, **train) -> Loop:
    params = small_run_params(train={"compile": "off", **train})
    dataset = ProcessedData(tiny_data)
    split = Split.open(dataset.split_path("train"), params.loader)
    mean, std = dataset.normalisation(torch.device("cpu"))
    return Loop(params.train, params.loader, split, mean, std, torch.device("cpu"))


def state(loop: Loop) -> dict:
    return {
        "model": {k: v.clone() for k, v in loop.model.state_dict().items()},
        "optimizer": repr(loop.optimizer.state_dict()),
        "rng": torch.get_rng_state().clone(),
    }


def same(a: dict, b: dict) -> bool:
    return (
        all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and a["optimizer"] == b["optimizer"]
        and torch.equal(a["rng"], b["rng"])
    )


def test_the_trial_step_changes_nothing_the_run_computes(tiny_data):
    """The trial runs the real step (here on the CPU) and puts everything back."""
    loop = cpu_loop(tiny_data)
    torch.manual_seed(3)
    before = state(loop)
    loop.trial_step()
    assert same(before, state(loop))
    assert all(p.grad is None for p in loop.model.parameters())


def test_a_model_that_runs_out_of_memory_stops_the_trial_with_state_intact(tiny_data):
    """A test double for a batch too big for the slice: the model's forward raises CUDA's OOM."""
    loop = cpu_loop(tiny_data)
    before = state(loop)

    class OutOfMemory(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 900.00 MiB")

    loop.step.model = OutOfMemory()
    with pytest.raises(PipelineError) as stopped:
        prove_fit(loop.trial_step, lambda: (int(0.2 * GIB), int(4.75 * GIB)), oom_error)
    assert "train.batch_size 512" in str(stopped.value) and "900.00 MiB" in str(stopped.value)
    assert same(before, state(loop))


def test_an_out_of_memory_later_in_training_stops_with_the_error_and_keeps_last_pt(
    tiny_data, tmp_path, monkeypatch
):
    """Epoch 1 trains and saves models/last.pt; epoch 2 runs out of memory (simulated): the
    stage stops with the error, and last.pt is the one epoch 1 saved, byte for byte."""
    from pcam_pipeline.train.preemption import StopFlag
    from pcam_pipeline.train.run import Trainer, fit
    from tests.tiny_pipeline import workdir

    real = Trainer.train_epoch

    def train_epoch(self, stop):
        if self.progress.epoch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(self, stop)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    params = small_run_params(train={"epochs": 2, "device": "cpu"})
    with workdir(tmp_path, tiny_data), StopFlag() as stop:
        with pytest.raises(PipelineError) as stopped:
            fit(params, stop, lambda row: None)
        last = (tmp_path / "models" / "last.pt").read_bytes()
    message = str(stopped.value)
    assert "at epoch 2; models/last.pt is kept as last saved" in message
    assert (
        f"train.batch_size {params.train.batch_size}" in message
        and "Tried to allocate 3.00 GiB" in message
    )
    from pcam_pipeline.train.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "models" / "last.pt")["progress"]["epoch"] == 1
    assert last == (tmp_path / "models" / "last.pt").read_bytes()
