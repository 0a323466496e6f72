"""A slide's patches for `pcam drift`: `pcam slides`' OUT/patches/<slide>.h5 (WSInfer's patch
file: level-0 top-left corners, the patch side in the attributes) read back from the slide file
itself, at those corners, through WSInfer's slide reader and the Resize of the exported model's
WSInfer config: the pixels WSInfer fed the model, before ToTensor and Normalize.

The patch file does not name its slide; OUT/summaries/<slide>.json does (`slide_path`), or
`--slide PATH` where the slide has moved. Only a seeded sample of the corners is read, so a
slide of any size costs at most `drift.input_patches` regions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export.runner import HDF5_SUFFIXES
from pcam_pipeline.repro import read_json
from pcam_pipeline.slides.run import SUMMARIES

COORDS = "coords"  # WSInfer's (and CLAM's) key of the corners
SLIDE_FIX = "give the slide with --slide PATH"


def is_patch_file(path: Path) -> bool:
    """A WSInfer patch file (key coords, no key x: not a PCAM-format file)."""
    if not (path.is_file() and path.suffix.lower() in HDF5_SUFFIXES):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return COORDS in handle and "x" not in handle
    except OSError:
        return False


def patch_grid(path: Path) -> tuple[np.ndarray, int]:
    """The (N, 2) level-0 corners and the level-0 patch side of a WSInfer patch file."""
    import h5py

    with h5py.File(path, "r") as handle:
        coords, attrs = handle[COORDS], handle[COORDS].attrs
        side, level = attrs.get("patch_size"), attrs.get("patch_level", 0)
        if coords.ndim != 2 or coords.shape[1] != 2 or side is None or level != 0:
            raise PipelineError(
                f"{path}: key coords holds {coords.dtype} {coords.shape} (patch_size {side}, "
                f"patch_level {level}), expected WSInfer's (N, 2) level-0 corners with a "
                "patch_size. Fix: give a patches/<slide>.h5 that `pcam slides` wrote"
            )
        if coords.shape[0] == 0:
            raise PipelineError(f"{path}: key coords holds no patches")
        return np.asarray(coords[()], dtype=np.int64), int(side)


def slide_of(patches: Path, given: Path | None) -> tuple[Path, dict[str, Any]]:
    """The slide `patches` was cut from (`given`, else its summary's) and that summary ({} if
    there is none)."""
    summary_path = patches.parent.parent / SUMMARIES / f"{patches.stem}.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    # `slide` (as listed, maybe relative) for summaries written before `slide_path`.
    recorded = summary.get("slide_path") or summary.get("slide")
    if given is not None:
        slide, where = given, "--slide"
    elif recorded:
        slide, where = Path(recorded), f"in {summary_path}"
    else:
        raise PipelineError(
            f"{patches}: no {summary_path} naming the slide these patches were cut from (the "
            f"patch file is not in `pcam slides`' output, or the slide is unfinished). "
            f"Fix: {SLIDE_FIX}"
        )
    if not slide.is_file():
        raise PipelineError(
            f"{slide}: not found: the slide {patches} was cut from ({where}); moved or deleted? "
            f"Fix: {SLIDE_FIX} (its new place)"
        )
    return slide, summary


def check_fits(
    slide: Path,
    dimensions: tuple[int, int],
    coords: np.ndarray,
    side: int,
    patches: Path,
    summary: dict[str, Any],
) -> None:
    """Refuse a slide other than the one the patches were cut from."""
    width, height = dimensions
    recorded = summary.get("width"), summary.get("height")
    if None not in recorded and recorded != (width, height):
        cut_from = f"a {recorded[0]}x{recorded[1]} slide"
    elif int(coords[:, 0].max()) + side > width or int(coords[:, 1].max()) + side > height:
        cut_from = "a larger slide (its patches run past this one's edge)"
    else:
        return
    raise PipelineError(
        f"{slide}: {width}x{height} pixels at level 0, but {patches} was cut from {cut_from}. "
        f"Fix: {SLIDE_FIX} (the one `pcam slides` scored)"
    )


def wsinfer_resize() -> Any:
    """The Resize WSInfer builds from the exported config (export/wsinfer.py's first transform,
    torchvision's on the PIL image), through WSInfer's own builder."""
    from wsinfer.modellib.transforms import make_compose_from_transform_config
    from wsinfer_zoo.client import TransformConfigurationItem

    return make_compose_from_transform_config(
        [TransformConfigurationItem(name="Resize", arguments={"size": PATCH_SHAPE[0]})]
    )


def read_slide_patches(
    patches: Path, given: Path | None, size: int, seed: int
) -> tuple[np.ndarray, Path]:
    """At most `size` patches (a seeded sample) of the slide `patches` lists, as WSInfer reads
    and resizes them: uint8 (n, 96, 96, 3), and the slide they came from."""
    from pcam_pipeline.slides import wsi

    coords, side = patch_grid(patches)
    slide_path, summary = slide_of(patches, given)
    slide = wsi.open_slide(slide_path)
    check_fits(slide_path, slide.dimensions, coords, side, patches, summary)
    take = min(size, len(coords))
    chosen = np.sort(np.random.default_rng(seed).choice(len(coords), take, replace=False))
    resize = wsinfer_resize()
    out = np.empty((take, *PATCH_SHAPE), dtype=np.uint8)
    for i, (x, y) in enumerate(coords[chosen]):
        # As WSInfer's WholeSlideImagePatches: level 0, RGBA to RGB, then the transforms.
        region = slide.read_region((int(x), int(y)), 0, (side, side)).convert("RGB")
        out[i] = np.asarray(resize(region))
    return out, slide_path
