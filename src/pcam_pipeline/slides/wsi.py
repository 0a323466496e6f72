"""One slide through WSInfer 0.6.1's own parts: its slide reader and spacing, its tissue
segmentation and patch grid (wsinfer.patchlib), its dataset, transforms and inference loop
(wsinfer.modellib.run_inference), and its GeoJSON writer.

Why the parts and not `segment_and_patch_one_slide`: that function returns nothing (the mask,
which gives the tissue area, stays inside it), reads the spacing from the file with no way to give
one, and logs "no tissue" instead of failing. The composition below is the same calls in the
same order with WSInfer's defaults; the patch files it writes are WSInfer's (`save_hdf5`), so
`run_inference` reads them as it reads its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.slides.summary import Tissue

# WSInfer's CLI defaults (`wsinfer run --help`): the segmentation its users get.
THUMBSIZE = (2048, 2048)
MEDIAN_FILTER_SIZE = 7
BINARY_THRESHOLD = 7
CLOSING_KERNEL_SIZE = 6
MIN_OBJECT_SIZE_UM2 = 200.0**2
MIN_HOLE_SIZE_UM2 = 190.0**2
PATCH_SUFFIX = ".h5"  # WSInfer's patch files (CLAM's HDF5 of coordinates)
PATCHES_DIR, CSV_DIR, GEOJSON_DIR, MASKS_DIR = (
    "patches", "model-outputs-csv", "model-outputs-geojson", "masks"
)  # fmt: skip


class SlideError(PipelineError):
    """This slide cannot be scored (unreadable, no tissue, no spacing); the others can."""


@dataclass(frozen=True)
class Segmented:
    """A slide's thumbnail, tissue and patch grid (level-0 top-left corners)."""

    dimensions: tuple[int, int]  # level-0 width, height
    um_px: float
    thumbnail: Image.Image
    tissue: Tissue
    patch_px: int  # patch side at level 0
    coords: np.ndarray  # (N, 2) minx, miny
    qc: Image.Image  # WSInfer's quality-control picture: the contours over the thumbnail


def load_model(model_dir: Path) -> Any:
    """WSInfer's model object for the exported TorchScript and config.json (schema-checked by
    WSInfer's own ModelConfiguration)."""
    from wsinfer.modellib.models import LocalModelTorchScript
    from wsinfer_zoo.client import ModelConfiguration

    config_path, model_path = model_dir / "config.json", model_dir / "torchscript_model.pt"
    for path in (config_path, model_path):
        if not path.is_file():
            raise PipelineError(
                f"{path}: not found; --model-dir must be the export stage's WSInfer model "
                "(models/export/wsinfer: `dvc repro export`)"
            )
    try:
        config = ModelConfiguration.from_dict(json.loads(config_path.read_text()))
    except Exception as exc:  # WSInfer raises jsonschema's errors and KeyError
        raise PipelineError(f"{config_path}: not a WSInfer model config ({exc})") from exc
    return LocalModelTorchScript(config=config, model_path=str(model_path))


def open_slide(path: Path) -> Any:
    from wsinfer.wsi import WSI

    try:
        return WSI(path)
    except Exception as exc:  # each backend raises its own (TiffFileError, OpenSlideError, ...)
        raise SlideError(
            f"{path}: cannot be read as a slide ({type(exc).__name__}: {exc})"
        ) from exc


def spacing(path: Path, given: float | None) -> tuple[float, str]:
    """Micrometres per level-0 pixel and where it came from; `given` (--spacing-um-px) wins."""
    from wsinfer.errors import CannotReadSpacing
    from wsinfer.wsi import get_avg_mpp

    if given is not None:
        return given, "--spacing-um-px"
    try:
        return float(get_avg_mpp(path)), "file"
    # WSInfer 0.6.1's last resort, tifffile, fails with AttributeError (tifffile.TIFF.RESUNIT is
    # gone from tifffile) where the file holds no unit: the same "no spacing" to the user.
    except (CannotReadSpacing, AttributeError) as exc:
        raise SlideError(
            f"{path}: no physical spacing (microns per pixel) in the file; give it with "
            "--spacing-um-px (e.g. 0.25 at 40x, 0.5 at 20x)"
        ) from exc


def segment(slide: Any, path: Path, um_px: float, model: Any) -> Segmented:
    """WSInfer's segmentation and patch grid for the model's patch size and spacing."""
    from wsinfer.patchlib import draw_contours_on_thumbnail
    from wsinfer.patchlib.patch import (
        get_multipolygon_from_binary_arr,
        get_patch_coordinates_within_polygon,
    )
    from wsinfer.patchlib.segment import segment_tissue

    width, height = slide.dimensions
    patch_px = round(model.config.patch_size_pixels * model.config.spacing_um_px / um_px)
    thumb = slide.get_thumbnail(THUMBSIZE).convert("RGB")
    thumb_um = (um_px * width / thumb.size[0], um_px * height / thumb.size[1])
    thumb_um2 = float(np.mean(thumb_um)) ** 2
    mask = segment_tissue(
        np.asarray(thumb),
        median_filter_size=MEDIAN_FILTER_SIZE,
        binary_threshold=BINARY_THRESHOLD,
        closing_kernel_size=CLOSING_KERNEL_SIZE,
        min_object_size_px=round(MIN_OBJECT_SIZE_UM2 / thumb_um2),
        min_hole_size_px=round(MIN_HOLE_SIZE_UM2 / thumb_um2),
    )
    scale = (width / thumb.size[0], height / thumb.size[1])
    found = get_multipolygon_from_binary_arr(mask.astype("uint8") * 255, scale=scale)
    if found is None:
        raise SlideError(
            f"{path}: no tissue found (WSInfer's segmentation of the thumbnail is empty): a blank "
            "or out-of-focus scan, or a stain too faint for its saturation threshold"
        )
    polygon, contours, hierarchy = found
    coords = get_patch_coordinates_within_polygon(
        slide_width=width,
        slide_height=height,
        patch_size=patch_px,
        half_patch_size=round(patch_px / 2),
        polygon=polygon,
        overlap=0.0,
    )
    if len(coords) == 0:
        raise SlideError(
            f"{path}: tissue found, but no patch of {patch_px} px has its centre in it"
        )
    qc = draw_contours_on_thumbnail(thumb, contours=contours, hierarchy=hierarchy)
    return Segmented(
        (width, height), um_px, thumb, Tissue(mask, thumb_um), patch_px, np.asarray(coords), qc
    )


def infer(
    path: Path,
    segmented: Segmented,
    model: Any,
    stage: Path,
    batch_size: int,
    num_workers: int,
    speedup: bool,
    threads: int,
) -> pd.DataFrame:
    """WSInfer's `run_inference` on this one slide, in `stage` (a results directory of
    WSInfer's layout); returns its CSV (minx, miny, width, height, prob_tumor) and writes its
    patch file, CSV and GeoJSON there. `threads`: torch's intra-op threads for the model in this
    process while it runs (the `num_workers` readers take one each: PyTorch's DataLoader).

    `run_inference` takes a directory of nothing but slides: a link to this one, so that each
    slide (and each Slurm task) has its own."""
    import torch
    from wsinfer.modellib.run_inference import run_inference
    from wsinfer.patchlib import save_hdf5
    from wsinfer.write_geojson import make_geojson

    slide_id = path.stem
    wsi_dir, results = stage / "wsi", stage / "results"
    wsi_dir.mkdir(parents=True)
    os.symlink(path.resolve(), wsi_dir / path.name)
    (results / PATCHES_DIR).mkdir(parents=True)
    save_hdf5(
        results / PATCHES_DIR / f"{slide_id}{PATCH_SUFFIX}",
        coords=segmented.coords,
        patch_size=segmented.patch_px,
        patch_spacing_um_px=model.config.spacing_um_px,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, failed = run_inference(wsi_dir, results, model, batch_size, num_workers, speedup)
    finally:
        torch.set_num_threads(before)
    csv = results / CSV_DIR / f"{slide_id}.csv"
    if failed or not csv.is_file():
        # run_inference swallows the reason; reading one patch the way its dataset does shows it.
        raise SlideError(f"{path}: WSInfer's inference failed on this slide ({_first_read(path)})")
    (results / GEOJSON_DIR).mkdir()
    make_geojson(csv, results)
    return pd.read_csv(csv)


def _first_read(path: Path) -> str:
    try:
        slide = open_slide(path)
        slide.read_region((0, 0), 0, (1, 1))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "see the log above"
