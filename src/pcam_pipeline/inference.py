"""Scoring patches with a model: shared by training (validation), evaluate and `pcam predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pcam_pipeline.data.loader import DeviceBatches, apply_symmetries, normalise, symmetry_tables
from pcam_pipeline.data.processed import normalisation
from pcam_pipeline.errors import CheckpointError, PipelineError, first_sentence
from pcam_pipeline.models.architectures import build_model
from pcam_pipeline.params import TrainParams
from pcam_pipeline.paths import BEST_CHECKPOINT
from pcam_pipeline.runtime import uses_channels_last
from pcam_pipeline.train.checkpoint import load_checkpoint

# Test-time augmentation: the symmetry codes (data/loader.py's) a patch is scored under. Flips:
# identity, rows, columns, both (rotation by 180 degrees); d8: with the transposes, all 8.
TTA_CODES = {"none": (0,), "flips": (0, 1, 2, 3), "d8": tuple(range(8))}


def under_symmetries(x: torch.Tensor, codes: tuple[int, ...]) -> torch.Tensor:
    """(B,H,W,C) -> (len(codes)*B,H,W,C): the batch under each symmetry in turn, one gather."""
    n = x.shape[0]
    every = torch.tensor(codes, device=x.device).repeat_interleave(n)
    tables = symmetry_tables(x.shape[1], x.device)
    return apply_symmetries(x.repeat(len(codes), 1, 1, 1), every, tables)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    batches: Any,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    bf16: bool = False,
    tta: str = "none",
) -> np.ndarray:
    """Sigmoid probabilities for uint8 (B,96,96,3) batches, in order; with `tta`, each patch's
    mean probability over the symmetries TTA_CODES[tta] (one forward of the batch under all).

    The probabilities stay on the device until the last batch: one wait, not one per batch.
    """
    model.eval()
    codes = TTA_CODES[tta]
    outputs = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        if len(codes) > 1:
            x = under_symmetries(x, codes)
        images = normalise(x, mean, std, channels_last=uses_channels_last(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        probs = torch.sigmoid(logits.float())
        outputs.append(probs.view(len(codes), -1).mean(dim=0) if len(codes) > 1 else probs)
    if not outputs:
        return np.empty(0)
    return torch.cat(outputs).cpu().numpy().astype(np.float64)


def predict_split(
    model: nn.Module,
    split: DeviceBatches,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    bf16: bool = False,
    tta: str = "none",
) -> np.ndarray:
    """Probabilities for a whole split, in file order, fed to its device as training is."""
    order = torch.arange(split.split.length)
    batches = (x for x, _ in split.batches(order, batch_size))
    return predict_batches(model, batches, mean, std, split.device, bf16, tta)


def model_from_checkpoint(
    path: Path, device: torch.device
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The model a checkpoint holds, with its normalisation statistics; needs nothing else.

    Raises CheckpointError for a file that cannot be loaded, or that loads but is not what
    `pcam train` writes (a bare state dict, another architecture's weights)."""
    checkpoint = load_checkpoint(path)
    try:
        train_params = TrainParams.model_validate(checkpoint["params"]["train"])
        model = build_model(train_params)
        model.load_state_dict(checkpoint["model"])
        mean, std = normalisation(checkpoint["normalisation"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        said = first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(
            path, f"not a checkpoint written by `pcam train` ({type(exc).__name__}: {said})"
        ) from None
    model.to(device)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model, mean, std, checkpoint


def trained_model(
    device: torch.device,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The pipeline's models/best.pt as `model_from_checkpoint` gives it, for the stages after
    train. It is a DVC output: never moved aside (DVC restores it from its cache), only named."""
    try:
        return model_from_checkpoint(BEST_CHECKPOINT, device)
    except CheckpointError as error:
        raise PipelineError(
            f"{BEST_CHECKPOINT}: {error.reason}. Fix: train again (`dvc repro train`) or "
            f"restore it from the DVC cache (`dvc checkout {BEST_CHECKPOINT}`)"
        ) from None
