"""The models: the course's MLP, a small CNN for 96x96 patches, and any timm architecture.
All output one logit."""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import TimmParams, TrainParams

INPUT_SHAPE = (PATCH_SHAPE[2], *PATCH_SHAPE[:2])  # channels first, as the convolutions take it


class MLP(nn.Module):
    """Flattened pixels through fully connected layers: the course's baseline."""

    def __init__(self, hidden_sizes: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(INPUT_SHAPE)
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class CNN(nn.Module):
    """conv-BN-ReLU-maxpool blocks halving the resolution, then global average pooling.

    The pooling is a plain mean (not AdaptiveAvgPool2d), whose CUDA backward is deterministic.
    """

    def __init__(self, channels: list[int], dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = INPUT_SHAPE[0]
        for size in channels:
            blocks += [
                nn.Conv2d(width, size, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(size),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            width = size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


class GlobalMean(nn.Module):
    """Global average pooling as a plain mean over H and W: the same numbers as
    AdaptiveAvgPool2d(1), with a CUDA backward that is deterministic (the adaptive one's is not,
    and training keeps torch's deterministic algorithms on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def deterministic_pooling(model: nn.Module) -> nn.Module:
    """Replace every global AdaptiveAvgPool2d of `model` by GlobalMean, in place."""
    for name, child in model.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
            setattr(model, name, GlobalMean())
        else:
            deterministic_pooling(child)
    return model


class TimmModel(nn.Module):
    """A timm architecture with one output: `net` is timm's model, whose state dict a
    pretrained file holds (names without the `net.` prefix)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def timm_network(params: TimmParams) -> nn.Module:
    """timm's model `params.name` for 96x96 patches with one output, randomly initialised.

    Architectures with a fixed input size (ViTs: the position embedding) are built for 96x96;
    the others take any size. Raises PipelineError naming train.timm's bad key.
    """
    import timm  # ~1 s to import: only for timm models

    if not timm.is_model(params.name):
        close = difflib.get_close_matches(params.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise PipelineError(
            f"params.yaml: train.timm.name '{params.name}' is not a timm model{hint} "
            "(all of them: python -c 'import timm; print(timm.list_models())')"
        )
    options: dict[str, object] = {"num_classes": 1, "drop_rate": params.drop_rate}
    if params.drop_path_rate > 0:  # not every architecture has stochastic depth
        options["drop_path_rate"] = params.drop_path_rate
    config = timm.models.get_pretrained_cfg(params.name)
    if config is not None and config.fixed_input_size:
        options["img_size"] = INPUT_SHAPE[1]
    try:
        net = timm.create_model(params.name, pretrained=False, **options)
    except TypeError as exc:
        raise PipelineError(
            f"params.yaml: timm's {params.name} does not take these options ({exc}); set "
            "train.timm.drop_path_rate: 0.0 for an architecture without stochastic depth"
        ) from None
    return deterministic_pooling(net)


def build_model(params: TrainParams) -> nn.Module:
    if params.model == "mlp":
        return MLP(params.mlp.hidden_sizes, params.mlp.dropout)
    if params.model == "timm":
        return TimmModel(timm_network(params.timm))
    return CNN(params.cnn.channels, params.cnn.dropout)
