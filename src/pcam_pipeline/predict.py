"""`pcam predict`: score new patches with a checkpoint, no params.yaml or dataset needed.

The checkpoint carries the architecture and the normalisation statistics, so a checkpoint file
and this package are all another machine needs (the offline handover).
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import torch

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.inference import model_from_checkpoint, predict_batches
from pcam_pipeline.repro import atomic_path
from pcam_pipeline.stages.train import resolve_device


def read_patches(inputs: list[Path]) -> tuple[np.ndarray, list[str]]:
    """uint8 (N,96,96,3) patches and a name for each, from one HDF5 file or PNG files."""
    if len(inputs) == 1 and inputs[0].suffix in (".h5", ".hdf5"):
        with h5py.File(inputs[0], "r") as handle:
            if "x" not in handle:
                raise PipelineError(f"{inputs[0]}: no dataset 'x' (keys: {sorted(handle)})")
            images = handle["x"][...]
        names = [f"{inputs[0].name}[{i}]" for i in range(len(images))]
    else:
        import matplotlib.image

        loaded = []
        for path in inputs:
            image = matplotlib.image.imread(path)
            if image.dtype != np.uint8:  # PNGs load as float in [0, 1]
                image = np.round(image * 255)
            loaded.append(image[..., :3])
        images, names = np.stack(loaded) if loaded else np.empty((0, *PATCH_SHAPE)), [
            p.name for p in inputs]
    if images.shape[1:] != PATCH_SHAPE:
        raise PipelineError(f"patches have shape {images.shape[1:]}, expected {PATCH_SHAPE} "
                            "(96x96 RGB, channels last)")
    return np.clip(images, 0, 255).astype(np.uint8), names


def main(checkpoint: Path, inputs: list[Path], out: Path, threshold: float | None,
         device_choice: str = "auto", batch_size: int = 256) -> None:
    device = resolve_device(device_choice)
    model, mean, std, _ = model_from_checkpoint(checkpoint, device)
    images, names = read_patches(inputs)
    tensor = torch.from_numpy(images)
    batches = (tensor[i:i + batch_size] for i in range(0, len(tensor), batch_size))
    probs = predict_batches(model, batches, mean, std, device)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patch", "probability", *(["prediction"] if threshold is not None else [])])
        for name, prob in zip(names, probs, strict=True):
            row = [name, f"{prob:.6f}"]
            if threshold is not None:
                row.append(int(prob >= threshold))
            writer.writerow(row)
