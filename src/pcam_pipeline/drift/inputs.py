"""The patches `pcam drift` and drift_reference read: a seeded sample of a PCAM-format HDF5
file's `x`, or every 96x96 image (PNG, TIFF, JPEG) under a folder, such as a slide's patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export.runner import HDF5_SUFFIXES, BadInput, decode_patch

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "TIFF", "JPEG")
INPUT_FIX = (
    "give a PCAM-format HDF5 file (*_x.h5, key x: uint8 (N, 96, 96, 3)) or a folder of 96x96 RGB "
    "PNG, TIFF or JPEG patches"
)


def seeded_sample(path: Path, size: int, seed: int) -> np.ndarray:
    """Up to `size` patches of an HDF5 file's `x`, drawn without replacement, in file order."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            x = handle["x"]
            shape, dtype = x.shape, x.dtype
            if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != (96, 96, 3):
                raise PipelineError(
                    f"{path}: key x holds {dtype} {tuple(shape)}, expected uint8 (N, 96, 96, 3). "
                    f"Fix: {INPUT_FIX}"
                )
            if shape[0] == 0:
                raise PipelineError(f"{path}: key x holds no patches. Fix: {INPUT_FIX}")
            take = min(size, shape[0])
            index = np.sort(np.random.default_rng(seed).choice(shape[0], take, replace=False))
            return x[index]
    except (OSError, KeyError) as exc:
        raise PipelineError(f"{path}: cannot read key x ({exc}). Fix: {INPUT_FIX}") from None


def image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def read_images(files: list[Path]) -> np.ndarray:
    patches = []
    for path in files:
        try:
            patches.append(decode_patch(path.read_bytes(), str(path), IMAGE_FORMATS))
        except BadInput as exc:
            raise PipelineError(
                f"{exc}. Fix: {INPUT_FIX} (cut larger images into 96x96 patches)"
            ) from None
    return np.stack(patches)


def read_input(path: Path, size: int, seed: int) -> np.ndarray:
    """At most `size` patches of `path` (a seeded sample where there are more)."""
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise PipelineError(
                f"{path}: no PNG, TIFF or JPEG files in this folder. Fix: {INPUT_FIX}"
            )
        if len(files) > size:
            chosen = np.sort(np.random.default_rng(seed).choice(len(files), size, replace=False))
            files = [files[i] for i in chosen]
        return read_images(files)
    if path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        return seeded_sample(path, size, seed)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return read_images([path])
    what = "not found" if not path.exists() else "neither an HDF5 file nor a folder"
    raise PipelineError(f"{path}: {what}. Fix: {INPUT_FIX}")
