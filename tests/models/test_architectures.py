"""models: timm architectures built for 96x96 patches with one logit, deterministic pooling,
and the portable CPU convolutions reaching every timm convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.models.architectures import (
    GlobalMean,
    TimmModel,
    build_model,
    deterministic_pooling,
)
from pcam_pipeline.params import TimmParams
from pcam_pipeline.train.loop import portable_convolutions
from tests.tiny_pipeline import small_run_params

timm = pytest.importorskip("timm", reason="timm is not installed: `make setup` installs it")


def timm_params(name: str, **options: object) -> TimmParams:
    return TimmParams(
        **{"name": name, "pretrained": None, "drop_rate": 0.0, "drop_path_rate": 0.0, **options}
    )


def timm_model(name: str, **options: object) -> nn.Module:
    train = {"model": "timm", "timm": {"name": name, **options}}
    return build_model(small_run_params(train=train).train)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "efficientnet_b0"])
def test_timm_models_map_96x96_patches_to_one_logit(name):
    model = timm_model(name)
    assert isinstance(model, TimmModel)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 96, 96)).shape == (2,)
    # Global pooling whose CUDA backward is deterministic: none of the adaptive kind is left.
    assert not [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]


def test_global_mean_pooling_gives_the_adaptive_pools_numbers():
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=1).eval()
    replaced = deterministic_pooling(timm.create_model("resnet18", num_classes=1).eval())
    replaced.load_state_dict(original.state_dict())
    assert any(isinstance(m, GlobalMean) for m in replaced.modules())
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(replaced(x), original(x), rtol=1e-6, atol=1e-6)


def test_a_name_timm_lacks_is_an_error_with_close_names():
    with pytest.raises(PipelineError, match=r"train\.timm\.name 'resnet1800'.*resnet18"):
        timm_model("resnet1800")


def test_portable_convolutions_reach_every_timm_convolution():
    model = portable_convolutions(timm_model("resnet18"))
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions
    assert all("_conv_forward" in vars(m) for m in convolutions), "each one patched"
    x = torch.randn(2, 3, 96, 96)
    model(x).sum().backward()  # the single-thread weight gradient runs for timm's layers
    assert all(m.weight.grad is not None for m in convolutions)
