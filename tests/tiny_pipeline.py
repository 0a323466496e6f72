"""Helpers for the train / evaluate / predict tests: a tiny processed dataset and small params.

The dataset is made with the project's own code (the synthetic generator, `ProcessedWriter`
and the processed dataset's channel statistics), so the tests exercise the real file layout.
Imported (`from tests.tiny_pipeline import ...`) by tests/stages/test_train.py,
tests/stages/test_evaluate.py, tests/test_predict.py and others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pcam_pipeline.data.channel_stats import ChannelStats
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.data.writers import ProcessedLayout, ProcessedWriter
from pcam_pipeline.params import Params, parse_params
from pcam_pipeline.paths import EXPORT_REPORT
from tests.conftest import raw_params_with

SIZES = {"train": 256, "valid": 64, "test": 64}

# Small enough for a 2-core CI runner, big enough for several batches per epoch.
SMALL_TRAIN: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 0.003,
    "cnn": {"channels": [8, 16], "dropout": 0.2},
    "mlp": {"hidden_sizes": [32], "dropout": 0.2},
    "warmup_epochs": 1,
    "device": "cpu",
    "log_every_steps": 1,  # the per-step series at every step: resumes must rebuild all of it
}


def raw_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """params.yaml of the repository, with SMALL_TRAIN and then `sections` merged in."""
    return raw_params_with({"train": SMALL_TRAIN}, sections)


def small_run_params(**sections: dict[str, Any]) -> Params:
    """Validated Params (through the project's own parser) for a small run."""
    return parse_params(raw_params(**sections), "tests/tiny_pipeline.py")


def write_params_file(directory: Path, **sections: dict[str, Any]) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params(**sections), sort_keys=False))
    return path


def write_tiny_dataset(directory: Path, sizes: dict[str, int] = SIZES, seed: int = 7) -> Path:
    """train/valid/test.h5 + stats.json in the processed layout, from the synthetic generator."""
    directory.mkdir(parents=True, exist_ok=True)
    dataset = ProcessedData(directory)
    stats = ChannelStats()
    for split, size in sizes.items():
        x, y = generate_split(seed, split, size, 0.5)
        with ProcessedWriter(dataset.split_path(split), ProcessedLayout(64, "none")) as writer:
            writer.append(x, y, np.arange(size))
        if split == "train":
            stats.update(x)
    dataset.write_stats(stats)
    return directory


def pcam(
    args: list[str],
    cwd: Path,
    data_dir: Path,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.Popen:
    """Start `pcam ARGS` in `cwd` (which holds params.yaml), reading data from `data_dir`, in
    `env` (default: this process's environment)."""
    env = {**(os.environ if env is None else env), "PCAM_TRAIN_DATA_DIR": str(data_dir)}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "pcam_pipeline.cli", *args], cwd=cwd, env=env, text=True, **kwargs
    )


def run_pcam(
    args: list[str],
    cwd: Path,
    data_dir: Path,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    process = pcam(args, cwd, data_dir, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, None)


def run_until_line(
    args: list[str],
    cwd: Path,
    data_dir: Path,
    marker: str,
    act: Callable[[subprocess.Popen], None],
    timeout: float = 300,
) -> tuple[int, str, bool]:
    """Start `pcam ARGS`, call `act(process)` once a line of its output contains `marker`, wait
    for it to end (killed after `timeout` s): (exit status, its output, whether `act` ran)."""
    process = pcam(args, cwd, data_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    lines, acted = [], False
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if not acted and marker in line:
                act(process)
                acted = True
        process.wait()
    finally:
        watchdog.cancel()
    return process.returncode, "".join(lines), acted


def training_outputs(run: Path) -> dict[str, bytes]:
    """The train stage's outputs (what dvc.yaml declares) by relative path; not the provenance
    records beside the checkpoints, which say when and where a run happened."""
    return {
        f"{top}/{name}": data
        for top in ("models", "dvclive")
        for name, data in tree_bytes(run / top).items()
        if not name.endswith(".provenance.json")
    }


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path: for byte-for-byte comparisons."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def workdir(directory: Path, data_dir: Path) -> Iterator[Path]:
    """Run a stage in-process as `dvc repro` would: cwd = `directory`, data from `data_dir`.

    Restores the cwd, the environment variable and torch's deterministic-algorithms switch
    (which train turns on) afterwards, so other tests in the session see what they expect.
    """
    directory.mkdir(parents=True, exist_ok=True)
    previous_env = os.environ.get("PCAM_TRAIN_DATA_DIR")
    deterministic = torch.are_deterministic_algorithms_enabled()
    os.environ["PCAM_TRAIN_DATA_DIR"] = str(data_dir)
    try:
        with contextlib.chdir(directory):
            yield directory
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if previous_env is None:
            os.environ.pop("PCAM_TRAIN_DATA_DIR", None)
        else:
            os.environ["PCAM_TRAIN_DATA_DIR"] = previous_env


def train_in(directory: Path, data_dir: Path, params: Params | None = None) -> Path:
    from pcam_pipeline.stages import train

    with workdir(directory, data_dir):
        train.main(params or small_run_params())
    return directory


# The tiny run's 64 test patches: one pair ranked the other way moves the AUROC by 1/1024
CALIBRATION = {"int8": {"calibration_patches": 64, "max_auroc_drop": 0.02}}


def export_params(**export: Any) -> Params:
    return small_run_params(export={**CALIBRATION, **export})


def export_in(trained_run: Path, target: Path, data_dir: Path) -> Path:
    """A copy of the small trained run, evaluated (reports/metrics.json) and exported
    (models/export/, reports/export.json)."""
    from pcam_pipeline.stages import evaluate

    shutil.copytree(trained_run / "models", target / "models")
    with workdir(target, data_dir):
        evaluate.main(small_run_params())
    run_export(target, data_dir)
    return target


def run_export(directory: Path, data_dir: Path, **export: Any) -> dict[str, Any]:
    """The export stage in `directory` with export_params(**export); its report."""
    from pcam_pipeline.stages import export as stage

    with workdir(directory, data_dir):
        stage.main(export_params(**export))
        return json.loads(EXPORT_REPORT.read_text())
