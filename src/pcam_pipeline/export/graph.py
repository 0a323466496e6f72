"""What the exported graphs compute: PCAM's stored form in, the tumour probability out.

`PatchClassifier` takes uint8 patches (N, 96, 96, 3), exactly as PCAM's HDF5 files and PNG
patches hold them, and returns the probability (N,). The preprocessing training used (scale to
[0, 1], standardise with the train split's channel statistics, channels first) and the test-time
augmentation evaluate used are inside the graph, in the same operations and order as
`inference.predict_batches`, so no client can preprocess differently from training.

`NormalisedLogit` is the form WSInfer runs: its transforms (ToTensor, Normalize) standardise
the patch, the model returns one logit per patch as (N, 1), and WSInfer applies the sigmoid.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "patches"
OUTPUT_NAME = "probability"
TTA_VIEWS = {"none": 1, "flips": 4, "d8": 8}


def symmetric_views(x: torch.Tensor, tta: str) -> torch.Tensor:
    """(N,H,W,C) -> (k*N,H,W,C): the batch under each symmetry of TTA_CODES[tta], in the code
    order of `data.loader.symmetry_tables` (bit 0 flips rows, bit 1 columns, bit 2 transposes),
    written with flips and a transpose, which every ONNX runtime has."""
    views = []
    for code in range(TTA_VIEWS[tta]):
        view = x.flip(1) if code & 1 else x
        view = view.flip(2) if code & 2 else view
        views.append(view.transpose(1, 2) if code & 4 else view)
    return torch.cat(views) if len(views) > 1 else x


def batchnorm_folded(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with each BatchNorm folded into the convolution or
    linear layer before it, computed in float64 and rounded once to float32.

    The ONNX exporter folds them itself, in float32, and its result differed in the last bit
    between an AVX-512 and an emulated AVX2 CPU; float64 multiplies, divides and square roots
    are correctly rounded on every CPU, so this fold is the same everywhere. A model torch.fx
    cannot trace is returned as it is (the exporter folds it then) and the log says so.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model).eval().double())
    except Exception as exc:  # symbolic tracing raises many kinds for Python control flow
        log.warning(
            "torch.fx cannot trace the model (%s): the ONNX exporter folds its batch "
            "normalisation in float32, which can differ in the last bit between CPUs",
            type(exc).__name__,
        )
        return model
    return fused.float().eval()


class PatchClassifier(nn.Module):
    """uint8 (N,96,96,3) -> probability (N,): normalisation, TTA and the sigmoid inside."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, tta: str) -> None:
        super().__init__()
        self.model = model
        self.tta = tta
        self.register_buffer("mean", mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().float().view(1, -1, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        views = symmetric_views(patches, self.tta)
        images = views.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std)
        probs = torch.sigmoid(self.model(images))
        k = TTA_VIEWS[self.tta]
        return probs.reshape(k, -1).mean(dim=0) if k > 1 else probs


class NormalisedLogit(nn.Module):
    """Standardised float (N,3,96,96) -> logit (N,1), what WSInfer's runner feeds and reads.

    With TTA the logit is that of the mean probability over the views, so WSInfer's sigmoid
    gives the probability `PatchClassifier` gives."""

    def __init__(self, model: nn.Module, tta: str) -> None:
        super().__init__()
        self.model = model
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = TTA_VIEWS[self.tta]
        if k == 1:
            return self.model(images).unsqueeze(1)
        # the views of an NCHW batch: H and W are dims 2 and 3 here
        views = symmetric_views(images.permute(0, 2, 3, 1), self.tta).permute(0, 3, 1, 2)
        probs = torch.sigmoid(self.model(views)).reshape(k, -1).mean(dim=0)
        return torch.logit(probs).unsqueeze(1)
