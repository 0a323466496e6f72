"""scripts/repro-check.py: a run's dvc.lock against the committed one, by the rule that fits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

CHECK = REPO_ROOT / "scripts" / "repro-check.py"


def entry(md5: str, path: str) -> dict[str, Any]:
    return {"path": path, "hash": "md5", "md5": md5}


# The shape of the project's dvc.lock: data stages, train (writes checkpoints), evaluate (reads
# best.pt), benchmark (reads only the data).
LOCK = {
    "schema": "2.0",
    "stages": {
        "preprocess": {
            "cmd": "pcam preprocess",
            "deps": [entry("a1", "data/pcam")],
            "outs": [entry("b1.dir", "data/processed")],
        },
        "train": {
            "cmd": "pcam train",
            "deps": [entry("b1.dir", "data/processed"), entry("c1", "src/train.py")],
            "params": {"params.yaml": {"cpu": {"numerics": "portable"}, "train": {"lr": 0.002}}},
            "outs": [entry("d1", "models/best.pt"), entry("e1", "dvclive/train/metrics.json")],
        },
        "evaluate": {
            "cmd": "pcam evaluate",
            "deps": [entry("d1", "models/best.pt"), entry("b1.dir", "data/processed")],
            "outs": [entry("f1", "reports/metrics.json")],
        },
        "benchmark": {
            "cmd": "pcam benchmark",
            "deps": [entry("b1.dir", "data/processed")],
            "outs": [entry("g1", "reports/benchmark.json")],
        },
    },
}
METRICS = {
    "test": {"auroc": 0.95, "accuracy": 0.89, "balanced_accuracy": 0.89},
    "valid": {"auroc": 0.95},
}
LIVE = {"val_auroc": 0.951, "val_accuracy": 0.9}
ON_THE_CPU = {"device": "cpu", "cpu": {"level": "x86-64-v3", "numerics": "portable"}}


def git(repo: Path, *args: str) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def write_run(repo: Path, lock: dict, metrics: dict, live: dict, record: dict | None) -> None:
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "reports/metrics.json").write_text(json.dumps(metrics))
    (repo / "dvclive/train").mkdir(parents=True, exist_ok=True)
    (repo / "dvclive/train/metrics.json").write_text(json.dumps(live))
    (repo / "models").mkdir(exist_ok=True)
    if record is not None:
        (repo / "models/best.provenance.json").write_text(json.dumps(record))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose HEAD holds the committed lock and metrics."""
    git(tmp_path, "init", "-q")
    write_run(tmp_path, LOCK, METRICS, LIVE, None)
    git(tmp_path, "add", "dvc.lock", "reports", "dvclive")
    git(tmp_path, "commit", "-q", "-m", "committed run")
    return tmp_path


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK)], cwd=repo, capture_output=True, text=True, check=False
    )


def retrained(auroc_shift: float = 0.0) -> tuple[dict, dict, dict]:
    """Our run: other weights (train's and evaluate's outputs), metrics moved by `auroc_shift`."""
    lock = copy.deepcopy(LOCK)
    lock["stages"]["train"]["outs"] = [entry("d2", "models/best.pt"), entry("e2", "x.json")]
    lock["stages"]["evaluate"]["deps"][0] = entry("d2", "models/best.pt")
    lock["stages"]["evaluate"]["outs"] = [entry("f2", "reports/metrics.json")]
    metrics = copy.deepcopy(METRICS)
    metrics["test"]["auroc"] += auroc_shift
    return lock, metrics, dict(LIVE, val_auroc=LIVE["val_auroc"] - 0.004)


def test_an_unchanged_lock_is_reproduced_bit_for_bit(repo):
    result = check(repo)
    assert result.returncode == 0 and "reproduced bit for bit" in result.stdout


def test_on_the_cpu_at_the_portable_level_other_weights_fail(repo):
    write_run(repo, *retrained(), ON_THE_CPU)
    result = check(repo)
    assert result.returncode == 1
    assert "rule: bit-identical, because this run trained on the CPU at x86-64-v3" in result.stdout
    assert "DIFFERS: train: its dvc.lock entry differs" in result.stderr
    assert "DIFFERS: evaluate" in result.stderr


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"device": "cuda:0", "cpu": ON_THE_CPU["cpu"]}, "trained on cuda:0"),
        (
            {
                "device": "cuda",
                "cpu": ON_THE_CPU["cpu"],
                "gpu": {
                    "names": ["NVIDIA A100-SXM4-40GB MIG 1g.5gb"],
                    "mig": True,
                    "profile": "1g.5gb",
                },
            },
            "trained on cuda (NVIDIA A100-SXM4-40GB MIG 1g.5gb, MIG profile 1g.5gb)",
        ),
        ({"device": "cpu", "cpu": {"level": "native", "cpu_model": "Core i5-2520M"}}, "lacks"),
        ({"device": "cpu", "cpu": {"level": "native", "numerics": "native"}}, "numerics is native"),
    ],
)
def test_a_gpu_or_unpinned_run_passes_within_the_tolerance(repo, record, reason):
    write_run(repo, *retrained(auroc_shift=-0.01), record)
    result = check(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule: tolerance" in result.stdout and reason in result.stdout
    assert "identical: benchmark, preprocess" in result.stdout
    assert "reports/metrics.json test.auroc: 0.9400 (committed 0.9500, |diff| 0.0100) ok" in (
        result.stdout
    )


def test_under_the_tolerance_rule_metrics_data_and_inputs_must_still_match(repo):
    gpu = {"device": "cuda:0", "cpu": ON_THE_CPU["cpu"]}
    write_run(repo, *retrained(auroc_shift=-0.05), gpu)
    result = check(repo)
    assert result.returncode == 1
    assert "test.auroc: 0.9000 (committed 0.9500, |diff| 0.0500) > 0.03" in result.stderr

    lock, metrics, live = retrained()
    lock["stages"]["preprocess"]["outs"] = [entry("b9.dir", "data/processed")]
    lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] = 0.003
    write_run(repo, lock, metrics, live, gpu)
    result = check(repo)
    assert result.returncode == 1
    assert "DIFFERS: preprocess: its dvc.lock entry differs" in result.stderr
    assert "DIFFERS: train: its inputs (code, params or data) differ" in result.stderr
    assert "identical: benchmark\n" in result.stdout  # not the preprocess that differs
