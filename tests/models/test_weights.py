"""`pcam weights download`: the hub's safetensors file into weights/, atomically, against a
real HTTP server on loopback answering the hub's endpoints ($HF_ENDPOINT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import hub_server

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed: `make setup`")
TAG = "resnet18.test_in1k"


def pcam_weights(args: list[str], cwd: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(cwd / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.cli", "weights", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_download_writes_the_hubs_file_under_weights(imagenet_resnet18: Path, tmp_path):
    served = imagenet_resnet18.read_bytes()
    with hub_server({f"timm/{TAG}/model.safetensors": served}) as (endpoint, requests):
        result = pcam_weights(["download", TAG], tmp_path, endpoint)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "weights" / f"{TAG}.safetensors"
    assert written.read_bytes() == served
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [written.name], "no leftovers"
    assert any(r.startswith("GET /timm/resnet18.test_in1k/resolve/") for r in requests), requests
    assert f"dvc add weights/{TAG}.safetensors" in result.stdout


def test_a_tag_the_hub_lacks_fails_clearly_and_writes_nothing(tmp_path):
    with hub_server({}) as (endpoint, _):
        result = pcam_weights(["download", "resnet18.no_such_tag"], tmp_path, endpoint)
    assert result.returncode == 1
    assert "timm/resnet18.no_such_tag/model.safetensors: download failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "weights").glob("*.safetensors"))


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    files = {f"timm/{TAG}/model.safetensors": b"<html>a login page</html>"}
    with hub_server(files) as (endpoint, _):
        result = pcam_weights(["download", TAG], tmp_path, endpoint)
    assert result.returncode == 1
    assert "not a safetensors file" in result.stderr
    assert not (tmp_path / "weights" / f"{TAG}.safetensors").exists()
