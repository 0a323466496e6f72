"""The model registry entries: dvc.yaml's `artifacts:` names models/best.pt and the exported
ONNX model, GTO registers a version as a git tag, and `dvc artifacts get` fetches it by name
from a DVC remote.

The remote is `pipeline_repo`'s cache directory, used read-only (a local DVC 3 remote has the
cache's layout): a clone of `pipeline_repo` declares it, GTO tags a version there, and the model
is fetched from a third directory, as a user of the registry would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pcam_pipeline.export.build import FP32_FILE
from pcam_pipeline.paths import BEST_CHECKPOINT, EXPORT_DIR
from tests.integration.conftest import run

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = "pcam-classifier"
ONNX_ARTIFACT = "pcam-classifier-onnx"
ONNX_MODEL = EXPORT_DIR / FP32_FILE


def declared_artifacts(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.artifacts.read()["dvc.yaml"]


def test_the_registry_entry_is_the_train_stages_best_checkpoint():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    train_outs = [next(iter(out)) for out in dvc_yaml["stages"]["train"]["outs"]]
    artifact = declared_artifacts(REPO_ROOT)[ARTIFACT]
    assert artifact.path == str(BEST_CHECKPOINT) in train_outs
    assert artifact.type == "model" and artifact.desc
    model = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["model"]
    assert artifact.labels == ["pcam", model]  # the architecture comes from params.yaml


@pytest.mark.heavy
def test_dvc_artifacts_get_fetches_the_registered_model(pipeline_repo: Path, tmp_path: Path):
    project = tmp_path / "project"
    run(["git", "clone", "-q", str(pipeline_repo), str(project)], tmp_path)
    run(["dvc", "remote", "add", "-d", "registry", str(pipeline_repo / ".dvc" / "cache")], project)
    run(["git", "commit", "-q", "-am", "the DVC remote the registry fetches from"], project)
    run(["gto", "register", ARTIFACT, "--version", "v1.0.0"], project)

    out = tmp_path / "fetched" / "best.pt"
    run(["dvc", "artifacts", "get", str(project), ARTIFACT, "-o", str(out)], tmp_path)

    fetched = hashlib.md5(out.read_bytes()).hexdigest()
    assert fetched == hashlib.md5((pipeline_repo / BEST_CHECKPOINT).read_bytes()).hexdigest()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    locked = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}
    assert fetched == locked[str(BEST_CHECKPOINT)]

    # The exported ONNX model: a file inside the export stage's output directory, fetched by
    # name as well; the model card beside it names the checkpoint it came from.
    run(["gto", "register", ONNX_ARTIFACT, "--version", "v1.0.0"], project)
    onnx = tmp_path / "fetched" / "model.onnx"
    run(["dvc", "artifacts", "get", str(project), ONNX_ARTIFACT, "-o", str(onnx)], tmp_path)
    assert onnx.read_bytes() == (pipeline_repo / ONNX_MODEL).read_bytes()
    card = json.loads((pipeline_repo / EXPORT_DIR / "model_card.json").read_text())
    assert card["model"]["checkpoint_md5"] == fetched
    assert card["files"]["model.onnx"]["md5"] == hashlib.md5(onnx.read_bytes()).hexdigest()


def test_the_onnx_entry_is_the_export_stages_model():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    export_outs = dvc_yaml["stages"]["export"]["outs"]
    artifact = declared_artifacts(REPO_ROOT)[ONNX_ARTIFACT]
    assert artifact.path == str(ONNX_MODEL) and ONNX_MODEL.parent == EXPORT_DIR
    assert str(EXPORT_DIR) in export_outs and artifact.type == "model"
