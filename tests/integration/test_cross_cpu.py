"""CPU training and the export write the same bytes on other x86-64 CPUs
(docs/reproducibility.md).

`pcam train` then `pcam export`, the real entry points (which pin the CPU numerics before torch
loads), run on this machine and under qemu-user emulating an Intel AVX2 CPU (Haswell) and an AMD
one (EPYC Rome): a few steps of the default CNN on a tiny dataset, then its ONNX, int8 (ONNX
Runtime's calibration runs on the emulated CPU's kernels), TorchScript and card. The
checkpoints, the dvclive logs and every exported file must be byte-identical to this machine's.
Emulation runs at about 1/1000 of the speed, so the runs are tiny, and all of them start at once
(one session fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pcam_pipeline import numerics
from tests.conftest import REPO_ROOT
from tests.integration.conftest import project_env, require_integration, run_command
from tests.tiny_pipeline import training_outputs, write_params_file, write_tiny_dataset

pytestmark = pytest.mark.heavy

CROSS_CPU = REPO_ROOT / "scripts" / "cross-cpu.sh"
TINY = {"train": 4, "valid": 4, "test": 4}
# Two steps of batch 2; the models as params.yaml has them (the CNN's 3 -> 16 first layer is
# the one whose weight gradient oneDNN splits over threads).
RUN = {
    "epochs": 1,
    "batch_size": 2,
    "cnn": {"channels": [16, 32, 64, 64]},
    "mlp": {"hidden_sizes": [256, 64]},
}
# The CNN only: its head is a Linear, so MKL's GEMM (the vendor-dependent path found for issue 17)
# is exercised too; the MLP under emulation doubled its share of CI (docs/reproducibility.md).
MODELS = ("cnn",)
# The tiny split's 4 test patches say nothing of int8's AUROC: this test is about bytes.
EXPORT = {"int8": {"calibration_patches": 4, "max_auroc_drop": 1.0}}
# What evaluate would have written (export reads the threshold and the metrics for the card).
METRICS = {
    "tta": "none",
    "threshold": {"rule": "youden", "value": 0.5, "chosen_on": "valid"},
    "test": {"auroc": 1.0, "accuracy": 1.0, "balanced_accuracy": 1.0},
    "valid": {"auroc": 1.0, "n": 4},
    "baseline": {"accuracy": 0.5},
}
# train, then export, in one shell: both under the emulator when there is one
STAGES = 'set -e; "$@" train; "$@" export'
PCAM = [sys.executable, "-m", "pcam_pipeline.cli"]


VENDORS = {"Haswell-v4": "GenuineIntel", "EPYC-Rome": "AuthenticAMD"}
NATIVE = "native"


@dataclass(frozen=True)
class Run:
    directory: Path
    returncode: int
    log: str

    def outputs(self) -> dict[str, bytes]:
        """The train stage's outputs and the export's (models/export/ lies under models/)."""
        report = self.directory / "reports" / "export.json"
        return {**training_outputs(self.directory), "reports/export.json": report.read_bytes()}


def unpinned_env(**extra: str) -> dict[str, str]:
    """The user's environment, without the variables the test process pinned: `pcam` must
    pin them itself."""
    pinned = {*numerics.PORTABLE_ENV, numerics.NUMERICS_ENV}
    return {k: v for k, v in project_env(**extra).items() if k not in pinned}


@pytest.fixture(scope="session")
def cross_cpu_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Run]:
    installed = run_command([CROSS_CPU, "install"], check=False, timeout=900)
    if installed.returncode != 0:
        require_integration(f"cannot install qemu-user: {installed.stderr.strip()[-2000:]}")
    cpus = run_command([CROSS_CPU, "models"]).stdout.split()
    assert sorted(cpus) == sorted(VENDORS), "test and script name the same CPU models"
    base = tmp_path_factory.mktemp("cross-cpu")
    data = write_tiny_dataset(base / "data", TINY)
    started = {}
    for model in MODELS:
        for cpu in (NATIVE, *cpus):
            directory = base / f"{model}-{cpu}"
            directory.mkdir()
            write_params_file(directory, train={**RUN, "model": model}, export=EXPORT)
            (directory / "reports").mkdir()
            (directory / "reports" / "metrics.json").write_text(json.dumps(METRICS))
            emulator = [] if cpu == NATIVE else [str(CROSS_CPU), "run", cpu]
            # One thread here, two under emulation: the thread count must not matter either.
            env = unpinned_env(PCAM_TRAIN_DATA_DIR=str(data), OMP_NUM_THREADS="1")
            if cpu != NATIVE:
                env.pop("OMP_NUM_THREADS")
            log = (directory / "train.log").open("w")
            started[(model, cpu)] = (
                directory,
                subprocess.Popen(
                    ["bash", "-c", STAGES, "-", *emulator, *PCAM],
                    cwd=directory,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
            )
    runs = {}
    for key, (directory, process) in started.items():
        try:
            process.wait(timeout=1500)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        runs[key] = Run(directory, process.returncode, (directory / "train.log").read_text())
    return runs


def provenance_cpu(run: Run) -> dict:
    import json

    return json.loads((run.directory / "models" / "best.provenance.json").read_text())["cpu"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("cpu", sorted(VENDORS))
def test_training_on_an_emulated_cpu_writes_the_bytes_this_cpu_writes(
    cross_cpu_runs: dict[tuple[str, str], Run], model: str, cpu: str
) -> None:
    here, there = cross_cpu_runs[(model, NATIVE)], cross_cpu_runs[(model, cpu)]
    for run in (here, there):
        assert run.returncode == 0, f"{run.directory.name} failed:\n{run.log[-3000:]}"
    # Both ran at the pinned level, and the emulated process did see the other CPU: no
    # AVX-512 (qemu-user passes the host's /proc/cpuinfo through, so the model name is ours).
    seen_here, seen_there = provenance_cpu(here), provenance_cpu(there)
    assert seen_there["vector_extensions"] == ["AVX2", "FMA3"], seen_there
    for seen in (seen_here, seen_there):
        assert seen["numerics"] == "portable" and seen["level"] == numerics.LEVEL, seen
        assert seen["torch_capability"] == "AVX2", seen
    assert (seen_here["torch_threads"], seen_there["torch_threads"]) == (1, os.cpu_count() or 1)
    ours, theirs = here.outputs(), there.outputs()
    assert sorted(ours) == sorted(theirs)
    assert "models/best.pt" in ours and "dvclive/train/metrics.json" in ours
    assert {"models/export/model.onnx", "models/export/model.int8.onnx"} <= set(ours)
    differing = [name for name in ours if ours[name] != theirs[name]]
    assert not differing, (
        f"{model} trained on an emulated {cpu} ({VENDORS[cpu]}) wrote other bytes than on "
        f"{seen_here['cpu_model']}: {differing}\n--- here\n{here.log[-1500:]}\n"
        f"--- {cpu}\n{there.log[-1500:]}"
    )
