"""Fixtures shared by the unit tests: params with small overrides, and small PCAM datasets."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcam_pipeline.params import Params, parse_params
from tests.pcam_files import make_pcam_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def raw_params_with(*layers: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml with each layer of nested overrides merged in, in order:
    the one params builder of the tests (tiny_pipeline's small runs add their layer first)."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for layer in layers:
        raw = merge(raw, layer)
    return raw


@pytest.fixture
def make_params() -> Callable[..., Params]:
    """Params from the repository's params.yaml with nested overrides applied."""

    def build(**overrides: Any) -> Params:
        return parse_params(raw_params_with(overrides))

    return build


@pytest.fixture
def small_params(make_params: Callable[..., Params]) -> Params:
    return make_params(
        fetch={"sizes": {"train": 96, "valid": 48, "test": 48}},
        train={"epochs": 1, "batch_size": 32, "cnn": {"channels": [8, 16]}},
    )


@pytest.fixture
def in_tmp_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run stages with relative paths inside an empty directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def pcam(tmp_path: Path) -> Path:
    """A small PCAM-format data/pcam (64/32/32 synthetic patches) under tmp_path."""
    return make_pcam_dir(tmp_path / "data" / "pcam")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/valid/test.h5 + stats.json: 256/64/64 synthetic patches in the processed layout."""
    from tests.tiny_pipeline import write_tiny_dataset  # it imports this module

    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def timm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64/16/16 synthetic patches in the processed layout: for the timm architectures' runs (a
    resnet18 step costs ~100 steps of the small CNN on 2 cores)."""
    from tests.tiny_pipeline import write_tiny_dataset

    sizes = {"train": 64, "valid": 16, "test": 16}
    return write_tiny_dataset(tmp_path_factory.mktemp("timm-data"), sizes)


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding models/ and dvclive/train/ of one small CNN run (small_run_params())."""
    from tests.tiny_pipeline import train_in

    return train_in(tmp_path_factory.mktemp("trained-run"), tiny_data)


@pytest.fixture(scope="session")
def exported_run(
    trained_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """trained_run, evaluated and exported: models/export/, reports/{metrics,export}.json."""
    from tests.tiny_pipeline import export_in

    return export_in(trained_run, tmp_path_factory.mktemp("exported-run"), tiny_data)


@pytest.fixture(scope="session")
def served(exported_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the exported model (models/export/), as a serving host has it.
    Tests copy it before editing the model; `pcam serve` writes its params.yaml here."""
    import shutil

    run = tmp_path_factory.mktemp("served")
    shutil.copytree(exported_run / "models" / "export", run / "models" / "export")
    return run


@pytest.fixture(scope="session")
def imagenet_resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors file as the hub holds timm's resnet18 weights (a 1000-class head), made
    from a seeded timm model: what `pcam weights download` fetches and train loads."""
    timm = pytest.importorskip("timm", reason="timm is not installed: `make setup` installs it")
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = timm.create_model("resnet18", num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("hub") / "resnet18.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, path)
    return path
