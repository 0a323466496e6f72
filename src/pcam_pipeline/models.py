"""The models: the course's MLP and a small CNN for 96x96 patches. Both output one logit."""

from __future__ import annotations

import math

import torch
from torch import nn

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.params import TrainParams

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


def build_model(params: TrainParams) -> nn.Module:
    if params.model == "mlp":
        return MLP(params.mlp.hidden_sizes, params.mlp.dropout)
    return CNN(params.cnn.channels, params.cnn.dropout)
