"""The offline handover: `pcam bundle`'s runner, in a fresh venv holding only numpy, pillow and
onnxruntime (nothing of this project, no torch), scores the test split as `pcam predict` does."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import run, run_command

pytestmark = pytest.mark.heavy


def read_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["patch"]: float(row["probability"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def runner_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the bundle's three pins (the runtime lock's) and what they pull."""
    from pcam_pipeline.export.bundle import runner_requirements
    from tests.conftest import REPO_ROOT

    base = tmp_path_factory.mktemp("runner-venv")
    requirements = base / "requirements.txt"
    requirements.write_text(runner_requirements(REPO_ROOT / "requirements-runtime.lock"))
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    run_command([python, "-m", "venv", base / "venv"])
    pip = base / "venv" / "bin" / "pip"
    run_command([pip, "install", "--quiet", "-r", requirements], timeout=900)
    return base / "venv" / "bin" / "python"


def test_the_runner_alone_scores_the_test_split_as_pcam_predict(
    pipeline_repo: Path, runner_venv: Path, tmp_path: Path
):
    bundle = tmp_path / "usb" / "pcam-model"
    run(["pcam", "bundle", str(bundle)], pipeline_repo)
    assert bundle.with_name("pcam-model.tar.gz").is_file()
    # The venv holds neither torch nor this project: the runner stands alone.
    for module in ("torch", "pcam_pipeline"):
        probe = run_command([runner_venv, "-c", f"import {module}"], check=False)
        assert probe.returncode != 0, f"{module} is importable in the runner's venv"

    with h5py.File(pipeline_repo / "data" / "processed" / "test.h5", "r") as handle:
        patches = handle["x"][...]
    folder = tmp_path / "patches"
    folder.mkdir()
    names = [folder / f"patch-{i:05d}.png" for i in range(len(patches))]
    for name, patch in zip(names, patches, strict=True):
        Image.fromarray(patch).save(name)

    runner_csv = tmp_path / "runner.csv"
    result = run_command(
        [runner_venv, bundle / "pcam_runner.py", folder, "--out", runner_csv], cwd=tmp_path
    )
    assert f"scored {len(patches)} patches" in result.stdout
    predict_csv = tmp_path / "predict.csv"
    run(
        ["pcam", "predict", "models/best.pt", *map(str, names), "--out", str(predict_csv)],
        pipeline_repo,
    )
    ours, theirs = read_scores(runner_csv), read_scores(predict_csv)
    assert list(ours) == list(theirs) == [str(n) for n in names]
    worst = max(abs(ours[n] - theirs[n]) for n in ours)
    print(f"runner vs pcam predict on {len(ours)} test patches: max |dp| {worst:.2g}")
    assert worst <= 1e-5
    with open(runner_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["prediction"] for row in rows} == {"0", "1"}, "decisions at the card's threshold"


def test_the_runner_names_what_it_cannot_read(pipeline_repo: Path, runner_venv, tmp_path):
    bundle = tmp_path / "pcam-model"
    run(["pcam", "bundle", str(bundle)], pipeline_repo)
    runner = bundle / "pcam_runner.py"
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((96, 96), dtype=np.uint8)).save(grey)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(small)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    h5 = pipeline_repo / "data" / "processed" / "test.h5"
    expected = {
        grey: "grey.png: mode L, expected an 8-bit RGB(A) patch",
        small: "small.png: 32x32 pixels, expected 96x96",
        text: "notes.png: not a readable image",
        h5: "reading HDF5 needs h5py (pip install h5py)",
    }
    for path, message in expected.items():
        out = tmp_path / "scores.csv"
        result = run_command([runner_venv, runner, path, "--out", out], check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not out.exists(), "no CSV from a failed run"
