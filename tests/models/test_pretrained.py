"""pretrained: a safetensors file loaded into a timm model, names and shapes checked; the train
stage fine-tunes from it."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.models.architectures import build_model
from pcam_pipeline.models.pretrained import load_pretrained
from pcam_pipeline.train.checkpoint import load_checkpoint
from pcam_pipeline.train.loop import prepare_model
from tests.tiny_pipeline import small_run_params, train_in, workdir

pytest.importorskip("timm", reason="timm is not installed: `make setup` installs it")
WEIGHTS = "weights/resnet18.test_in1k.safetensors"


def resnet(name: str = "resnet18", pretrained: str | None = WEIGHTS, **train: object):
    timm = {"name": name, "pretrained": pretrained}
    return small_run_params(train={"model": "timm", "timm": timm, **train})


def project_with(weights: Path, directory: Path) -> Path:
    (directory / "weights").mkdir(parents=True)
    shutil.copy(weights, directory / WEIGHTS)
    return directory


def test_the_file_is_loaded_and_the_other_head_reinitialised(imagenet_resnet18, tmp_path, caplog):
    project_with(imagenet_resnet18, tmp_path)
    file = load_file(imagenet_resnet18)
    with workdir(tmp_path, tmp_path), caplog.at_level(logging.INFO):
        model = prepare_model(resnet().train, torch.device("cpu"))
    state = model.state_dict()
    assert all(torch.equal(state[f"net.{k}"], v) for k, v in file.items() if not k.startswith("fc"))
    assert state["net.fc.weight"].shape == (1, 512), "PCAM's one logit, freshly initialised"
    assert "the classifier (fc.bias, fc.weight) does not fit" in caplog.text


def test_weights_of_another_architecture_are_an_error_naming_the_tensors(imagenet_resnet18):
    resnet34 = build_model(resnet("resnet34").train)
    with pytest.raises(PipelineError) as error:
        load_pretrained(resnet34.net, imagenet_resnet18)
    said = str(error.value)
    assert "layer1.2.bn1.bias: in the model, not in the file" in said  # resnet34's 3rd block
    assert re.search(r"\.\.\. and \d+ more", said) and "train.timm.name" in said


def test_a_tensor_of_another_shape_is_an_error_naming_it(imagenet_resnet18, tmp_path):
    tensors = load_file(imagenet_resnet18)
    tensors["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, changed)
    with pytest.raises(PipelineError, match=r"conv1\.weight: shape \(64, 3, 3, 3\) in the file, "):
        load_pretrained(build_model(resnet().train).net, changed)


def test_a_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(PipelineError, match="pcam weights download"):
        load_pretrained(build_model(resnet().train).net, tmp_path / "absent.safetensors")


@pytest.mark.heavy
def test_the_train_stage_fine_tunes_from_the_file(imagenet_resnet18, timm_data, tmp_path):
    project = project_with(imagenet_resnet18, tmp_path)
    run = train_in(project, timm_data, resnet(epochs=1, batch_size=8))
    trained = load_checkpoint(run / "models" / "last.pt")["model"]["net.conv1.weight"]
    pretrained = load_file(imagenet_resnet18)["conv1.weight"]
    torch.manual_seed(0)
    fresh = build_model(resnet(pretrained=None).train).state_dict()["net.conv1.weight"]
    assert not torch.equal(trained, pretrained), "it trained"
    moved, unrelated = (trained - pretrained).norm(), (fresh - pretrained).norm()
    assert moved < unrelated / 5, f"started from the file: moved {moved:.3f} vs {unrelated:.3f}"
