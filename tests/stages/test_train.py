"""train: bit-identical twin runs, kill-and-resume equality, checkpoints, best selection, models."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pcam_pipeline import numerics
from pcam_pipeline.errors import EXIT_PREEMPTED, Preempted
from pcam_pipeline.models.architectures import CNN, MLP, build_model
from pcam_pipeline.params import TrainParams
from pcam_pipeline.repro import md5_file
from pcam_pipeline.train.checkpoint import load_checkpoint
from pcam_pipeline.train.loop import TrainStep
from pcam_pipeline.train.preemption import StopFlag
from pcam_pipeline.train.resume import CHECKPOINT_FORMAT, recorded_params
from pcam_pipeline.train.run import Trainer, is_better
from tests.conftest import REPO_ROOT
from tests.tiny_pipeline import (
    run_pcam,
    run_until_line,
    small_run_params,
    train_in,
    training_outputs,
    workdir,
    write_params_file,
)

METRICS = (
    "grad_norm",
    "lr",
    "train_accuracy",
    "train_loss",
    "val_accuracy",
    "val_auroc",
    "val_loss",
)
OUTPUT_FILES = sorted(
    [
        "models/best.pt",
        "models/last.pt",
        "models/last.steps.json",  # the per-step series, beside the checkpoint
        "dvclive/train/metrics.json",
        *(f"dvclive/train/plots/metrics/{name}.tsv" for name in METRICS),
        "dvclive/train/plots/metrics/steps/grad_norm.tsv",
        "dvclive/train/plots/metrics/steps/lr.tsv",
    ]
)


outputs = training_outputs


def assert_same_bytes(first: dict[str, bytes], second: dict[str, bytes]) -> None:
    assert sorted(first) == sorted(second) == OUTPUT_FILES
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"these outputs differ between the two runs: {differing}"


# --- bit-identical runs -------------------------------------------------------------------------


def test_twin_runs_are_bit_identical(trained_run, tiny_data, tmp_path):
    # The twin reads a staged copy (PCAM_TRAIN_DATA_DIR elsewhere, as on a Slurm node): the same
    # files at another path must not change a single byte of the checkpoints or the logs.
    staged = shutil.copytree(tiny_data, tmp_path / "node-local" / "processed")
    twin = train_in(tmp_path / "twin", staged)
    assert_same_bytes(outputs(trained_run), outputs(twin))
    # ...and the run did train: the weights moved away from the seeded initialisation.
    torch.manual_seed(small_run_params().train.seed)
    initial = build_model(small_run_params().train).state_dict()
    final = load_checkpoint(twin / "models" / "last.pt")["model"]
    assert not torch.equal(initial["head.1.weight"], final["head.1.weight"])


# --- kill and resume ----------------------------------------------------------------------------

STOP_AT = "epoch 2 batch 3/8 "  # debug line after the 3rd of 8 batches of the 2nd (last) epoch


def run_until_stopped(run: Path, data: Path, sig: signal.Signals) -> tuple[int, str]:
    """`pcam -v train`, sent `sig` once its log shows the 3rd batch of epoch 2 is done."""
    code, log, sent = run_until_line(
        ["-v", "train"], run, data, STOP_AT, lambda process: process.send_signal(sig), 240
    )
    assert sent, f"never saw {STOP_AT!r} in the log:\n{log[-4000:]}"
    return code, log


def assert_saved_mid_epoch(run: Path, first_batch: int) -> int:
    saved = load_checkpoint(run / "models" / "last.pt")["progress"]
    assert saved["epoch"] == 1, "stopped during the second epoch"
    assert first_batch <= saved["batch"] < 8, f"saved mid-epoch, after the batch in flight: {saved}"
    assert not saved["complete"]
    assert len(saved["history"]) == 1
    assert saved["sums"]["steps"] == saved["batch"]
    return saved["batch"]


def test_cpu_training_is_the_same_for_1_2_and_4_threads(trained_run, tiny_data, tmp_path):
    # The first convolution (3 -> 8 channels: one block of output channels) is the one whose
    # weight gradient oneDNN splits over the threads it has; portable numerics (the default)
    # sum it on one thread, so any thread count trains the same weights.
    default = torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            run = train_in(tmp_path / f"threads-{threads}", tiny_data)
            assert_same_bytes(outputs(trained_run), outputs(run))
    finally:
        torch.set_num_threads(default)


def test_native_numerics_leave_the_libraries_to_choose(tiny_data, tmp_path):
    # `cpu.numerics: native`: no pinned kernels, the CPU's own best (AVX-512 where it has it),
    # and the provenance record says so.
    write_params_file(tmp_path, cpu={"numerics": "native"})
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}
    unpinned = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    result = run_pcam(["train"], tmp_path, tiny_data, env=env)
    assert result.returncode == 0, result.stdout
    record = json.loads((tmp_path / "models" / "best.provenance.json").read_text())["cpu"]
    assert record["numerics"] == record["level"] == "native"
    assert record["torch_capability"] == unpinned
    assert record["environment"] == dict.fromkeys(numerics.PORTABLE_ENV)


def test_preempted_process_exits_75_and_resumes_to_identical_outputs(
    trained_run, tiny_data, tmp_path
):
    # `pcam train` as Slurm runs it: SIGUSR1 mid-epoch, exit 75, then the same command again.
    # trained_run is the uninterrupted run of the same params (written to params.yaml here).
    write_params_file(tmp_path)
    code, log = run_until_stopped(tmp_path, tiny_data, signal.SIGUSR1)
    assert code == EXIT_PREEMPTED, log[-4000:]
    assert "preempted: stopped by SIGUSR1 at epoch 2" in log
    batch = assert_saved_mid_epoch(tmp_path, 3)

    resumed = run_pcam(["train"], tmp_path, tiny_data)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from models/last.pt at epoch 2, batch {batch}" in resumed.stdout
    assert "starting afresh" not in resumed.stdout
    assert_same_bytes(outputs(trained_run), outputs(tmp_path))


def test_sigterm_mid_batch_stops_after_it_and_resumes_identically(
    trained_run, tiny_data, tmp_path, monkeypatch, caplog
):
    forward_loss, calls = TrainStep._forward_loss, []

    def forward_then_sigterm(self, *args):  # once per batch, before the backward pass
        calls.append(1)
        if len(calls) == 8 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward_loss(self, *args)

    monkeypatch.setattr(TrainStep, "_forward_loss", forward_then_sigterm)
    with pytest.raises(Preempted, match="stopped by SIGTERM at epoch 2, batch 3;"):
        train_in(tmp_path, tiny_data)
    assert assert_saved_mid_epoch(tmp_path, 3) == 3, "the batch in flight is finished, no more"
    monkeypatch.undo()
    # The second run must pick up models/last.pt (not start afresh and merely end up equal).
    with caplog.at_level("INFO", logger=Trainer.__module__):
        train_in(tmp_path, tiny_data)
    resumed = [r.getMessage() for r in caplog.records if r.name == Trainer.__module__]
    assert "resuming from models/last.pt at epoch 2, batch 3" in resumed, resumed
    assert not [m for m in resumed if "starting afresh" in m], resumed
    assert_same_bytes(outputs(trained_run), outputs(tmp_path))


def test_streamed_and_in_memory_runs_do_not_resume_each_other(tiny_data, tmp_path):
    # The two visit the train split in different orders; which one a run gets depends on the
    # memory available, so a checkpoint only resumes into the same one.
    with workdir(tmp_path, tiny_data):
        in_memory = Trainer(small_run_params())
        streamed = Trainer(small_run_params(loader={"in_memory": False}))
    assert (in_memory.order, streamed.order) == ("memory", "stream:512")
    assert in_memory.fingerprint != streamed.fingerprint


def test_stop_flag_catches_both_signals_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with StopFlag() as stop:
            os.kill(os.getpid(), sig)
            assert stop.signal == sig
    assert {sig: signal.getsignal(sig) for sig in before} == before


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoints_record_params_data_versions_and_rng(trained_run, tiny_data):
    params = small_run_params()
    stats = json.loads((tiny_data / "stats.json").read_text())
    for name in ("best.pt", "last.pt"):
        checkpoint = load_checkpoint(trained_run / "models" / name)
        assert checkpoint["format"] == CHECKPOINT_FORMAT
        assert checkpoint["params"] == recorded_params(params)
        assert checkpoint["data_order"] == "memory"
        provenance = checkpoint["provenance"]
        assert provenance["data_md5"] == {
            f: md5_file(tiny_data / f) for f in ("stats.json", "train.h5", "valid.h5")
        }
        # Where and when the run happened is no part of the checkpoint's bytes...
        assert not {"git_commit", "host", "created_utc"} & set(provenance)
        # ...it is in the record beside it, which names the checkpoint's exact bytes.
        record = json.loads(
            (trained_run / "models" / name.replace(".pt", ".provenance.json")).read_text()
        )
        assert record["checkpoint"] == name
        assert record["md5"] == md5_file(trained_run / "models" / name)
        assert {"git_commit", "git_dirty", "host", "created_utc", "environment"} <= set(record)
        assert provenance["device"] == "cpu"
        # The library builds, the thread count and the CPU are in the record too: two torch
        # builds or thread counts that compute the same tensors write the same checkpoint.
        assert set(provenance) == {"data_md5", "device"}
        cpu = record["cpu"]
        assert cpu["numerics"] == "portable" and cpu["torch_threads"] == torch.get_num_threads()
        assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
        assert {"level", "cpu_vendor", "cpu_model", "environment"} <= set(cpu)
        versions = record["versions"]
        assert versions["torch"] == torch.__version__
        assert versions["numpy"] == np.__version__
        assert {"python", "h5py", "dvc"} <= set(versions)
        rng = checkpoint["rng"]
        assert rng["torch"].dtype == torch.uint8
        assert rng["numpy"]["key"].shape == (624,)
        assert len(rng["python"]["state"]) == 625
        assert checkpoint["normalisation"] == {
            "mean": pytest.approx(stats["mean"]),
            "std": pytest.approx(stats["std"]),
        }
        model = build_model(params.train)
        model.load_state_dict(checkpoint["model"])  # strict: exactly this architecture
        assert isinstance(model, CNN)
    last = load_checkpoint(trained_run / "models" / "last.pt")["progress"]
    assert last["complete"] and last["epoch"] == params.train.epochs
    assert len(last["history"]) == params.train.epochs


def test_the_provenance_record_names_the_git_commit(tiny_data, tmp_path):
    git = ["git", "-c", "user.name=pcam-tests", "-c", "user.email=tests@pcam.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "code"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not part of the commit\n")
    with workdir(tmp_path, tiny_data):
        trainer = Trainer(small_run_params())
        trainer.save(Path("models/last.pt"))
    record = json.loads((tmp_path / "models" / "last.provenance.json").read_text())
    assert record["git_commit"] == head
    assert record["git_dirty"] is False, "untracked files do not make the code dirty"
    assert "git_commit" not in trainer.checkpoint()["provenance"]


# --- logging and best selection -----------------------------------------------------------------


def test_dvclive_logs_every_epoch_without_timestamps(trained_run):
    history = load_checkpoint(trained_run / "models" / "last.pt")["progress"]["history"]
    plots = trained_run / "dvclive" / "train" / "plots" / "metrics"
    assert sorted(p.stem for p in plots.glob("*.tsv")) == sorted(METRICS)
    for name in METRICS:
        header, *rows = (plots / f"{name}.tsv").read_text().splitlines()
        assert header == f"step\t{name}", "only step and value: no timestamp column"
        steps, values = zip(*(row.split("\t") for row in rows), strict=True)
        assert [int(s) for s in steps] == list(range(len(history)))
        assert [float(v) for v in values] == [row[name] for row in history]
    summary = json.loads((trained_run / "dvclive" / "train" / "metrics.json").read_text())
    assert summary == {"step": len(history) - 1, **{k: history[-1][k] for k in METRICS}}
    # every train plot dvc.yaml declares is a file the stage writes
    declared = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["plots"]
    paths = {
        path
        for plot in declared
        if isinstance(plot, dict)
        for spec in plot.values()
        for path in (spec.get("y") or {})
        if path.startswith("dvclive/train/")
    }
    assert paths and all((trained_run / path).is_file() for path in paths)


def test_dvclive_logs_the_gradient_norm_and_lr_per_step(trained_run):
    """The course's per-step gradient norm (train.log_every_steps, 1 here): a point per optimiser
    step, whose mean over an epoch is that epoch's logged norm; kept beside last.pt too."""
    history = load_checkpoint(trained_run / "models" / "last.pt")["progress"]["history"]
    plots = trained_run / "dvclive" / "train" / "plots" / "metrics" / "steps"
    series = {}
    for name in ("grad_norm", "lr"):
        header, *rows = (plots / f"{name}.tsv").read_text().splitlines()
        assert header == f"step\t{name}"
        series[name] = [(int(s), float(v)) for s, v in (row.split("\t") for row in rows)]
    steps = [step for step, _ in series["grad_norm"]]
    assert len(steps) > len(history) and steps == list(range(1, len(steps) + 1))
    per_epoch = len(steps) // len(history)
    for epoch, row in enumerate(history):
        norms = [v for _, v in series["grad_norm"][epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sum(norms) / len(norms) == pytest.approx(row["grad_norm"], rel=1e-6)
        assert series["lr"][(epoch + 1) * per_epoch - 1][1] == pytest.approx(row["lr"])
    kept = json.loads((trained_run / "models" / "last.steps.json").read_text())
    assert [row["step"] for row in kept] == steps
    summary = json.loads((trained_run / "dvclive" / "train" / "metrics.json").read_text())
    assert "steps" not in summary  # plots only: metrics.json holds the epoch's numbers


SCRIPTED = [  # validation results of three epochs: each metric prefers a different epoch
    {"val_auroc": 0.95, "val_loss": 0.60, "val_accuracy": 0.70},
    {"val_auroc": 0.90, "val_loss": 0.30, "val_accuracy": 0.75},
    {"val_auroc": 0.85, "val_loss": 0.40, "val_accuracy": 0.80},
]


def skip_to_epoch_end(trainer: Trainer) -> None:
    """Stand-in for an epoch of training: plausible running sums, position at the epoch's end."""
    trainer.progress.sums = {
        "loss": 1.0,
        "correct": 1.0,
        "seen": 2.0,
        "grad_norm": 1.0,
        "steps": 1.0,
    }
    trainer.progress.batch = trainer.steps_per_epoch


@pytest.mark.parametrize(
    ("metric", "best_epoch"), [("val_auroc", 1), ("val_loss", 2), ("val_accuracy", 3)]
)
def test_best_checkpoint_is_chosen_by_select_metric(
    metric, best_epoch, tiny_data, tmp_path, monkeypatch
):
    def scripted_epoch(self, stop) -> None:
        # stand-in for training: every weight becomes the epoch number, to tell epochs apart
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.fill_(self.progress.epoch + 1)
        skip_to_epoch_end(self)

    results = iter(SCRIPTED)
    monkeypatch.setattr(Trainer, "train_epoch", scripted_epoch)
    monkeypatch.setattr("pcam_pipeline.train.run.evaluate_split", lambda *args: dict(next(results)))
    params = small_run_params(train={"model": "mlp", "epochs": 3, "select_metric": metric})
    train_in(tmp_path, tiny_data, params)

    best = load_checkpoint(tmp_path / "models" / "best.pt")
    assert best["progress"]["best_epoch"] == best_epoch
    assert best["progress"]["best_value"] == SCRIPTED[best_epoch - 1][metric]
    assert all(bool((t == best_epoch).all()) for t in best["model"].values())
    last = load_checkpoint(tmp_path / "models" / "last.pt")
    assert all(bool((t == 3).all()) for t in last["model"].values())


def test_signal_between_epochs_stops_before_the_next_one(tiny_data, tmp_path, monkeypatch):
    def quick_epoch(self, stop) -> None:  # stand-in for training, as above
        skip_to_epoch_end(self)

    def validate_then_sigusr1(*args):  # the signal lands while epoch 1 is being validated
        os.kill(os.getpid(), signal.SIGUSR1)
        return dict(SCRIPTED[0])

    monkeypatch.setattr(Trainer, "train_epoch", quick_epoch)
    monkeypatch.setattr("pcam_pipeline.train.run.evaluate_split", validate_then_sigusr1)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 before epoch 2;"):
        train_in(tmp_path, tiny_data, small_run_params(train={"model": "mlp", "epochs": 3}))
    saved = load_checkpoint(tmp_path / "models" / "last.pt")["progress"]
    assert (saved["epoch"], saved["batch"], len(saved["history"])) == (1, 0, 1)


@pytest.mark.parametrize(("patience", "decays"), [(1, [0, 0, 1, 2]), (2, [0, 0, 0, 1])])
def test_plateau_decays_after_patience_epochs_without_a_new_best(
    patience, decays, tiny_data, tmp_path, monkeypatch
):
    # val_loss: a best, two epochs without a new one, then a best again. Patience 1 decays
    # after each bad epoch, patience 2 only after the second in a row.
    losses = iter([0.5, 0.6, 0.7, 0.4])
    monkeypatch.setattr(
        "pcam_pipeline.train.run.evaluate_split",
        lambda *args: {"val_loss": next(losses), "val_accuracy": 0.5, "val_auroc": 0.5},
    )
    plateau = {"schedule": "plateau", "warmup_epochs": 0, "plateau_patience": patience}
    params = small_run_params(train={"model": "mlp", "epochs": 4, "gamma": 0.5, **plateau})
    train_in(tmp_path, tiny_data, params)
    history = load_checkpoint(tmp_path / "models" / "last.pt")["progress"]["history"]
    # each epoch's lr is the one its steps trained with
    assert [row["lr"] for row in history] == [params.train.lr * 0.5**n for n in decays]


def test_is_better_direction_and_nan():
    assert is_better("val_loss", 0.2, 0.3) and not is_better("val_loss", 0.4, 0.3)
    assert is_better("val_auroc", 0.9, 0.8) and not is_better("val_auroc", 0.7, 0.8)
    assert is_better("val_auroc", 0.5, None)
    assert not is_better("val_auroc", math.nan, None), "NaN never becomes best"
    assert is_better("val_auroc", 0.5, math.nan)


# --- models -------------------------------------------------------------------------------------


def test_mlp_trains(tiny_data, tmp_path):
    params = small_run_params(train={"model": "mlp"})
    train_in(tmp_path, tiny_data, params)
    best = load_checkpoint(tmp_path / "models" / "best.pt")
    assert best["params"]["train"]["model"] == "mlp"
    model = build_model(TrainParams.model_validate(best["params"]["train"]))
    assert isinstance(model, MLP)
    model.load_state_dict(best["model"])
    history = load_checkpoint(tmp_path / "models" / "last.pt")["progress"]["history"]
    assert len(history) == params.train.epochs
    assert all(math.isfinite(row[name]) for row in history for name in METRICS)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(row["val_auroc"] for row in history) > 0.8, "the MLP learns the synthetic signal"
    assert best["progress"]["best_value"] == max(row["val_auroc"] for row in history)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_models_map_patches_to_one_logit(model):
    net = build_model(small_run_params(train={"model": model}).train)
    assert net(torch.zeros(5, 3, 96, 96)).shape == (5,)


# --- timm architectures: the same promises ------------------------------------------------------

TIMM_MODELS = ["resnet18", "vit_tiny_patch16_224"]  # a timm CNN, and a ViT built for 96x96


def timm_train(name: str) -> dict[str, object]:
    # Batches of 8 from timm_data's 64 training patches: the same 8 batches an epoch as the
    # CNN's runs (STOP_AT), at a quarter of the cost of tiny_data's.
    return {"model": "timm", "timm": {"name": name, "drop_path_rate": 0.1}, "batch_size": 8}


@pytest.fixture(scope="session", params=TIMM_MODELS)
def timm_run(request, timm_data, tmp_path_factory) -> tuple[str, Path]:
    """One uninterrupted small run of each timm architecture: (its name, its directory)."""
    name = request.param
    run = tmp_path_factory.mktemp(f"timm-{name}")
    return name, train_in(run, timm_data, small_run_params(train=timm_train(name)))


@pytest.mark.heavy
def test_a_timm_twin_preempted_by_sigusr1_resumes_to_identical_outputs(
    timm_run, timm_data, tmp_path
):
    # The twin: another process (two: stopped, then resumed) trains the same params as the
    # in-process reference; every output byte must match. One test for both promises: a
    # resnet18 run costs ~25 s on 2 cores.
    name, reference = timm_run
    write_params_file(tmp_path, train=timm_train(name))
    code, log = run_until_stopped(tmp_path, timm_data, signal.SIGUSR1)
    assert code == EXIT_PREEMPTED, log[-4000:]
    batch = assert_saved_mid_epoch(tmp_path, 3)
    resumed = run_pcam(["train"], tmp_path, timm_data)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from models/last.pt at epoch 2, batch {batch}" in resumed.stdout
    assert_same_bytes(outputs(reference), outputs(tmp_path))
    best = load_checkpoint(tmp_path / "models" / "best.pt")
    assert best["params"]["train"]["timm"]["name"] == name
    history = best["progress"]["history"]
    assert all(math.isfinite(row[metric]) for row in history for metric in METRICS)
