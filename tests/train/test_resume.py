"""checkpoints: when a run resumes, what the fingerprint covers, the random generators' state,
and checkpoints that are refused or set aside."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pcam_pipeline.errors import RefusedCheckpoint
from pcam_pipeline.params import TrainParams
from pcam_pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pcam_pipeline.train.resume import (
    CHECKPOINT_FORMAT,
    LOGGING_ONLY,
    TRAINED_SECTIONS,
    CheckpointSetAside,
    fingerprint,
    recorded_params,
    rng_state,
    set_rng_state,
    try_resume,
)
from tests.conftest import REPO_ROOT
from tests.tiny_pipeline import small_run_params


def test_resume_only_matching_unfinished_checkpoints(trained_run, tmp_path):
    finished = load_checkpoint(trained_run / "models" / "last.pt")
    assert finished["progress"]["complete"]
    expected = finished["fingerprint"]
    path = tmp_path / "last.pt"

    save_checkpoint(path, finished)
    assert try_resume(path, expected) is None, "a finished run starts afresh"
    unfinished = {**finished, "progress": {**finished["progress"], "complete": False}}
    save_checkpoint(path, unfinished)
    assert try_resume(path, expected) is not None
    assert try_resume(path, "0" * 64) is None, "other params or data start afresh"
    save_checkpoint(path, {**unfinished, "format": CHECKPOINT_FORMAT + 1})
    assert try_resume(path, expected) is None, "another checkpoint format starts afresh"
    assert try_resume(tmp_path / "absent.pt", expected) is None


def test_fingerprint_covers_train_params_data_and_order():
    params, data = small_run_params(), {"train.h5": "a" * 32}
    base = fingerprint(params, data, "memory")
    assert base == fingerprint(small_run_params(), dict(data), "memory")
    assert base != fingerprint(small_run_params(train={"lr": 0.001}), data, "memory")
    assert base != fingerprint(params, {"train.h5": "b" * 32}, "memory")
    assert base != fingerprint(params, data, "stream:512")
    # evaluate-only params do not invalidate a half-finished training run
    assert base == fingerprint(small_run_params(evaluate={"n_slices": 8}), data, "memory")


def test_a_checkpoint_records_the_params_the_train_stage_declares():
    # The sections its weights depend on, the same as dvc.yaml's train params: another stage's
    # params never change a checkpoint's bytes, and none that matters is left out.
    declared = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["train"]["params"]
    assert sorted(TRAINED_SECTIONS) == sorted(declared)
    params = small_run_params()
    everything = params.as_dict()
    weights_only = {k: v for k, v in everything["train"].items() if k not in LOGGING_ONLY}
    unused_timm = {k: v for k, v in weights_only.items() if k != "timm"}
    assert recorded_params(params) == {
        **{s: everything[s] for s in TRAINED_SECTIONS},
        "train": unused_timm,  # the CNN's checkpoints did not change when train.timm came
    }
    timm_run = small_run_params(train={"model": "timm"})
    timm_params = {k: v for k, v in timm_run.as_dict()["train"].items() if k not in LOGGING_ONLY}
    assert recorded_params(timm_run)["train"] == timm_params
    # What is only logged (the per-step series) is no part of a checkpoint or its fingerprint.
    sparse = small_run_params(train={"log_every_steps": 1000})
    assert recorded_params(sparse) == recorded_params(params)
    assert fingerprint(sparse, {}, "memory") == fingerprint(params, {}, "memory")
    assert fingerprint(timm_run, {}, "memory") != fingerprint(
        small_run_params(train={"model": "timm", "timm": {"name": "resnet50"}}), {}, "memory"
    )
    assert recorded_params(small_run_params(evaluate={"n_slices": 8})) == recorded_params(params)
    # `pcam predict` rebuilds the model from the record.
    rebuilt = TrainParams.model_validate(recorded_params(params)["train"])
    assert rebuilt.model_dump(exclude=set(LOGGING_ONLY)) == params.train.model_dump(
        exclude=set(LOGGING_ONLY)
    )
    # Another CPU numerics setting is another run: it does not resume this one.
    data = {"train.h5": "a" * 32}
    native = small_run_params(cpu={"numerics": "native"})
    assert fingerprint(native, data, "memory") != fingerprint(params, data, "memory")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian and a mid-stream position behind
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})

    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.normal(size=3).tolist(), random.random()

    expected = draws()
    draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


class CodeInPickle:
    """Unpickling this runs a shell command: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_loading_refuses_a_pickle_with_code(tmp_path):
    # The payload is live: an unrestricted load does run it.
    proof = tmp_path / "unsafe-load-ran"
    torch.save({"model": CodeInPickle(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()

    marker = tmp_path / "payload-ran"
    torch.save({"model": CodeInPickle(marker), "format": 1}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": CodeInPickle(marker)}, protocol=2))
    for name in ("evil.pt", "evil.pkl"):  # torch's zip format and a bare legacy pickle
        with pytest.raises(RefusedCheckpoint, match="refused to load"):
            load_checkpoint(tmp_path / name)
        evil = (tmp_path / name).read_bytes()
        with pytest.raises(CheckpointSetAside, match=r"refused to load.*moved to"):
            try_resume(tmp_path / name, "any")
        [moved] = tmp_path.glob(f"{name}.refused-*")  # kept, under a name that says why
        assert moved.read_bytes() == evil and not (tmp_path / name).exists()
    assert not marker.exists(), "the checkpoint's code ran"
