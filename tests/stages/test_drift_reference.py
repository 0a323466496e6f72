"""The drift_reference stage on the tiny trained run, and `pcam drift` with its model: the
confidence and embedding tests join the image features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline import cli
from pcam_pipeline.drift.features import FEATURES
from pcam_pipeline.drift.profile import load_reference
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.paths import BEST_CHECKPOINT, DRIFT_DIR
from pcam_pipeline.repro import md5_file
from tests.conftest import REPO_ROOT
from tests.tiny_pipeline import small_run_params, workdir, write_params_file

DRIFT = {"reference_patches": 200, "model_patches": 64, "input_patches": 64}
DRIFT_RUN = {**DRIFT, "mmd_permutations": 50}


@pytest.fixture(scope="module")
def drift_run(trained_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny run's models/ with models/drift/ written by the stage."""
    from pcam_pipeline.stages import drift_reference

    run = tmp_path_factory.mktemp("drift-run")
    shutil.copytree(trained_run / "models", run / "models")
    with workdir(run, tiny_data):
        drift_reference.main(small_run_params(drift=DRIFT_RUN))
    return run


def test_the_stage_writes_a_versioned_reference_beside_the_model(drift_run: Path):
    reference = load_reference(drift_run / DRIFT_DIR)
    meta = reference.meta
    assert reference.features.shape == (200, len(FEATURES))
    assert meta["model_md5"] == md5_file(drift_run / BEST_CHECKPOINT)
    assert meta["feature_split"] == "train" and meta["model_split"] == "valid"
    assert (meta["model_patches"], meta["seed"], meta["alpha"]) == (64, 0, 0.05)
    # the CNN's embedding: its last conv block's 16 channels, the input of the final linear layer
    assert reference.embeddings.shape == (64, 16) == (64, meta["embedding_dim"])
    assert np.all((reference.confidence >= 0.5) & (reference.confidence <= 1.0))
    names = sorted(p.name for p in (drift_run / DRIFT_DIR).iterdir())
    assert names == ["reference.json", "reference.npz"]  # no temporary file left


def test_the_stage_names_a_missing_checkpoint(tiny_data: Path, tmp_path: Path, capsys):
    from pcam_pipeline.stages import drift_reference

    with workdir(tmp_path, tiny_data), pytest.raises(PipelineError, match="dvc repro train"):
        drift_reference.main(small_run_params(drift=DRIFT_RUN))


def test_pcam_drift_with_the_model(drift_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    params = write_params_file(tmp_path, drift=DRIFT_RUN)
    out = tmp_path / "dark.json"
    with h5py.File(tiny_data / "test.h5") as handle:
        test = handle["x"][:]
    calm = tmp_path / "test_x.h5"
    with h5py.File(calm, "w") as handle:
        handle["x"] = test
    plots = ["--plots", str(tmp_path / "plots"), "--checkpoint", str(drift_run / BEST_CHECKPOINT)]
    reference = ["--params", str(params), "drift", "--reference", str(drift_run / DRIFT_DIR)]
    assert cli.main([*reference, str(calm), "--out", str(tmp_path / "calm.json"), *plots]) == 0
    shifted = tmp_path / "dark_x.h5"
    with h5py.File(shifted, "w") as handle:
        handle["x"] = (test * 0.7).astype(np.uint8)
    pcam = ["--params", str(params), "drift", str(shifted), "--out", str(out)]
    pcam += ["--reference", str(drift_run / DRIFT_DIR), "--plots", str(tmp_path / "plots")]
    code = cli.main([*pcam, "--checkpoint", str(drift_run / BEST_CHECKPOINT)])
    report = json.loads(out.read_text())
    tests = {t["name"]: t for t in report["tests"]}
    assert code == 3 and report["drift"] is True
    assert tests["embedding"]["test"] == "mmd" and tests["confidence"]["test"] == "ks"
    assert report["n_tests"] == len(FEATURES) + 2 and report["notes"] == []

    other = tmp_path / "other.pt"
    other.write_bytes((drift_run / BEST_CHECKPOINT).read_bytes() + b"\0")
    code = cli.main([*pcam, "--checkpoint", str(other)])
    assert code == 1
    assert "not the model the reference was written with" in capsys.readouterr().err


def test_the_bundle_carries_the_reference_of_its_model(
    drift_run: Path, exported_run: Path, tmp_path, capsys
):
    from pcam_pipeline.export import bundle

    lock = REPO_ROOT / "requirements-runtime.lock"
    export = exported_run / "models" / "export"
    bundle.main(export, tmp_path / "b", lock, drift_run / DRIFT_DIR)
    assert (
        load_reference(tmp_path / "b" / "drift").meta == load_reference(drift_run / DRIFT_DIR).meta
    )
    bundle.main(export, tmp_path / "c", lock, tmp_path / "nothing")
    assert "no drift reference in" in capsys.readouterr().out
    assert not (tmp_path / "c" / "drift").exists()
    foreign = shutil.copytree(drift_run / DRIFT_DIR, tmp_path / "foreign")
    meta = json.loads((foreign / "reference.json").read_text())
    (foreign / "reference.json").write_text(json.dumps({**meta, "model_md5": "0" * 32}))
    with pytest.raises(PipelineError, match="drift_reference"):
        bundle.main(export, tmp_path / "d", lock, foreign)
