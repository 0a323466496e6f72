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


@pytest.mark.heavy
def test_model_get_fetches_a_tagged_version_checked_against_dvc_lock(
    pipeline_repo: Path, tmp_path: Path
):
    project = tmp_path / "project"
    run(["git", "clone", "-q", str(pipeline_repo), str(project)], tmp_path)
    # A remote of our own (hard links of the cache's objects), so one object can be corrupted.
    remote = tmp_path / "remote"
    run(["cp", "-al", str(pipeline_repo / ".dvc" / "cache"), str(remote)], tmp_path)
    run(["dvc", "remote", "add", "-d", "registry", str(remote)], project)
    run(["git", "commit", "-q", "-am", "the DVC remote the registry fetches from"], project)
    run(["gto", "register", ARTIFACT, "--version", "v1.2.0"], project)
    run(["gto", "assign", ARTIFACT, "--version", "v1.2.0", "--stage", "prod"], project)
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    stage_tag = run(["git", "tag", "--list", f"{ARTIFACT}#prod#*"], project).stdout.split()[0]
    for tag, stage in ((f"{ARTIFACT}@v1.2.0", None), (stage_tag, "prod")):
        out = (
            tmp_path / "model" / stage_tag.replace("#", "-") if stage else tmp_path / "model" / "v"
        )
        run(["pcam", "model-get", tag, "--out", str(out)], project)
        record = json.loads((out / "registry.json").read_text())
        assert record["version"] == "v1.2.0" and record["stage"] == stage
        assert record["commit"] == head
        assert (out / "best.pt").read_bytes() == (pipeline_repo / BEST_CHECKPOINT).read_bytes()
        assert (out / "export" / FP32_FILE).read_bytes() == (
            pipeline_repo / ONNX_MODEL
        ).read_bytes()
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        export_md5 = next(o["md5"] for o in lock["stages"]["export"]["outs"])
        assert record["md5"][str(EXPORT_DIR)] == export_md5

    # The remote's copy of the model card replaced by other bytes: refused, nothing written.
    card = pipeline_repo / EXPORT_DIR / "model_card.json"
    digest = hashlib.md5(card.read_bytes()).hexdigest()
    stored = remote / "files" / "md5" / digest[:2] / digest[2:]
    stored.unlink()  # a hard link: the pipeline's own cache keeps its copy
    stored.write_text('{"edited": true}\n')
    refused = run(["pcam", "model-get", f"{ARTIFACT}@v1.2.0", "--out", "bad"], project, check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{EXPORT_DIR} fetched for {ARTIFACT}@v1.2.0: md5" in refused.stderr
    assert not (project / "bad").exists()

    wrong = run(["pcam", "model-get", "resnet@v1.0.0"], project, check=False)
    assert wrong.returncode == 1 and "not a GTO tag of pcam-classifier" in wrong.stderr
