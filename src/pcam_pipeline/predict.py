"""`pcam predict`: score new patches with a checkpoint, no params.yaml or dataset needed.

The checkpoint carries the architecture and the normalisation statistics, so a checkpoint file
and this package are all another machine needs (the offline handover). Patches come from HDF5
files (dataset `x`, (N,96,96,3), read block by block so a PCAM-sized file needs little memory)
or PNG files (96x96 RGB or RGBA), scored in the order given, with the same preprocessing and
precision evaluate uses, so a patch gets the probability evaluate gave it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.errors import CheckpointError, PipelineError, first_sentence
from pcam_pipeline.inference import model_from_checkpoint, predict_batches
from pcam_pipeline.repro import atomic_path
from pcam_pipeline.runtime import resolve_device, uses_bf16

HDF5_SUFFIXES = (".h5", ".hdf5")
INPUTS = "give one HDF5 file with dataset 'x' of shape (N,96,96,3), or 96x96 PNG patches"


def _as_uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return np.clip(np.nan_to_num(images, nan=0.0), 0, 255).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    """One 96x96 patch as uint8 RGB (an alpha channel is dropped)."""
    import matplotlib.image

    try:
        image = matplotlib.image.imread(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise PipelineError(f"{path}: not an HDF5 file or PNG image ({exc}); {INPUTS}") from None
    if image.dtype != np.uint8:  # PNGs load as float in [0, 1]
        image = np.round(image * 255)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[:2] != PATCH_SHAPE[:2]:
        raise PipelineError(
            f"{path}: image has shape {image.shape}, expected 96x96 RGB(A) (a PCAM patch)"
        )
    return _as_uint8(image[..., :3])


def hdf5_blocks(path: Path, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, uint8 patches) blocks of an HDF5 file's dataset `x`, in order."""
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        said = first_sentence(str(exc)) or type(exc).__name__
        if not h5py.is_hdf5(path):  # a text file or an image named .h5
            raise PipelineError(
                f"{path}: not an HDF5 file or PNG image ({said}); {INPUTS}"
            ) from None
        raise PipelineError(
            f"{path}: a damaged HDF5 file ({said}); copy or write it again, or {INPUTS}"
        ) from None
    with handle:
        if "x" not in handle:
            raise PipelineError(
                f"{path}: no dataset 'x' (keys: {sorted(handle)}); "
                "expected PCAM layout, x of shape (N,96,96,3)"
            )
        x = handle["x"]
        if x.ndim != 4 or x.shape[1:] != PATCH_SHAPE:
            raise PipelineError(
                f"{path}: 'x' has shape {x.shape}, expected (N, 96, 96, 3) "
                "(96x96 RGB, channels last)"
            )
        for start in range(0, x.shape[0], batch_size):
            try:
                block = x[start : start + batch_size]
            except OSError as exc:  # a corrupt chunk, a file cut short
                last = min(start + batch_size, x.shape[0]) - 1
                raise PipelineError(
                    f"{path}: patches {start}..{last} cannot be read ({exc}): a damaged file; "
                    "copy or write it again"
                ) from None
            yield [f"{path}[{i}]" for i in range(start, start + len(block))], _as_uint8(block)


def patch_blocks(inputs: list[Path], batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Every input's patches in the order given, in blocks of at most `batch_size`."""
    pending: list[Path] = []

    def flush() -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            yield [str(p) for p in chunk], np.stack([read_png(p) for p in chunk])
        pending.clear()

    for path in inputs:
        if not path.is_file():
            raise PipelineError(f"{path}: no such file")
        if path.suffix.lower() in HDF5_SUFFIXES:
            yield from flush()
            yield from hdf5_blocks(path, batch_size)
        else:
            pending.append(path)
    yield from flush()


def main(
    checkpoint: Path,
    inputs: list[Path],
    out: Path,
    threshold: float | None,
    device_choice: str = "auto",
    batch_size: int = 256,
    tta: str = "none",
) -> None:
    device = resolve_device(device_choice)
    try:
        model, mean, std, state = model_from_checkpoint(checkpoint, device)
    except CheckpointError as error:
        raise PipelineError(
            f"{checkpoint}: {error.reason}. Fix: give a checkpoint written by `pcam train` "
            "(models/best.pt of a finished run)"
        ) from None
    # evaluate scores with bf16 autocast on CUDA when the run trained that way: do the same.
    bf16 = uses_bf16(bool(state["params"]["train"].get("bf16", False)), device)
    names: list[str] = []

    def batches() -> Iterator[torch.Tensor]:
        for block_names, block in patch_blocks(inputs, batch_size):
            names.extend(block_names)
            yield torch.from_numpy(block)

    probs = predict_batches(model, batches(), mean, std, device, bf16, tta)
    header = ["patch", "probability", *(["prediction"] if threshold is not None else [])]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for name, prob in zip(names, probs, strict=True):
            row = [name, f"{prob:.6f}"]
            if threshold is not None:
                row.append(int(prob >= threshold))
            writer.writerow(row)
