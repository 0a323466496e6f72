"""`pcam slides LIST_OR_DIR --out DIR`: every slide scored, one summary each, a cohort table.

Layout of DIR: WSInfer's results layout (patches/, masks/, model-outputs-csv/,
model-outputs-geojson/: what `wsinfer run` writes and QuPath's WSInfer tools read) plus
heatmaps/ID.png, tissue/ID.png (the tissue mask), summaries/ID.json, errors/ID.json and
cohort.{csv,json}. A slide is finished when its summary exists: it is written last, so a rerun
(or a requeued Slurm task) skips exactly the finished slides. Each file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pcam_pipeline.errors import PipelineError, Preempted
from pcam_pipeline.repro import atomic_path, read_json, write_json
from pcam_pipeline.slides import wsi
from pcam_pipeline.slides.summary import heatmap, summarise
from pcam_pipeline.train.preemption import StopFlag

log = logging.getLogger(__name__)

SUMMARIES, ERRORS, HEATMAPS, TISSUE, WORK = "summaries", "errors", "heatmaps", "tissue", ".work"
COHORT = "cohort"
HEATMAP_SIDE = 1024  # the heatmap PNG's longer side, in pixels
COLUMNS = (
    "slide_id", "status", "patches", "tissue_area_mm2", "max_probability",
    "top_k_mean_probability", "patches_above_threshold", "area_above_threshold_mm2",
    "um_px", "seconds", "error", "slide",
)  # fmt: skip


@dataclass(frozen=True)
class Options:
    model_dir: Path
    card: Path | None = None  # the model card with the threshold [model_dir/../model_card.json]
    threshold: float | None = None  # overrides the card's
    spacing_um_px: float | None = None  # for slides whose files hold none
    batch_size: int = 64
    # Patch-reading processes (DataLoader workers) beside the model; 0 (reading in-process, as
    # WSInfer's default) was the fastest measured on the shared 2-core VM (docs/slides.md).
    num_workers: int = 0
    top_k: int = 10
    # WSInfer's --speedup: the TorchScript frozen and optimised for inference (conv-bn folding,
    # oneDNN): about 3x the patches/s on the 2-core VM, probabilities within 1e-12.
    speedup: bool = True
    threads: int | None = None  # torch's threads for the model [model_threads]


def model_threads(options: Options) -> int:
    """torch's intra-op threads for the model: as given, else the usable cores less one per
    reader and one for everything else, at least one: on the shared 2-core VM a second model
    thread waits for a core that other work holds (1.7x slower, docs/slides.md)."""
    if options.threads is not None:
        return options.threads
    return max(1, len(os.sched_getaffinity(0)) - options.num_workers - 1)


def slide_list(source: Path) -> list[Path]:
    """The slides of a directory (its files, sorted) or of a list file (one path a line, blank
    lines and # comments skipped, relative paths from the current directory)."""
    if source.is_dir():
        slides = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    elif source.is_file():
        lines = (line.strip() for line in source.read_text().splitlines())
        slides = [Path(line) for line in lines if line and not line.startswith("#")]
    else:
        raise PipelineError(f"{source}: not found; give a directory of slides or a list file")
    if not slides:
        raise PipelineError(f"{source}: no slides in it")
    seen: dict[str, Path] = {}
    for slide in slides:
        if slide.stem in seen:
            raise PipelineError(
                f"{source}: {seen[slide.stem]} and {slide} share the ID '{slide.stem}' (the file "
                "name less its suffix) that names their outputs: rename one"
            )
        seen[slide.stem] = slide
    return slides


def chunk(slides: list[Path], index: int, size: int) -> list[Path]:
    """The `index`-th group of `size` slides: one Slurm array task's share."""
    if index < 0 or size < 1 or index * size >= len(slides):
        raise PipelineError(
            f"--chunk {index} of {size} slide(s) is past the list's {len(slides)} slides: the "
            f"array must be 0-{(len(slides) - 1) // max(size, 1)}"
        )
    return slides[index * size : (index + 1) * size]


def threshold(options: Options) -> tuple[float, str]:
    if options.threshold is not None:
        return options.threshold, "--threshold"
    card = options.card or options.model_dir.parent / "model_card.json"
    try:
        return float(read_json(card)["metrics"]["threshold"]["value"]), str(card)
    except FileNotFoundError as exc:
        raise PipelineError(f"{card}: not found; give --card or --threshold") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(
            f"{card}: no metrics.threshold.value (not the export stage's model card?); "
            "give --card or --threshold"
        ) from exc


def _write_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def score_slide(
    path: Path, out: Path, model: Any, options: Options, cut: tuple[float, str]
) -> dict[str, Any]:
    """Score one slide and write its outputs, the summary last; returns the summary."""
    started = time.perf_counter()
    slide_id = path.stem
    for stale in (out / WORK).glob(f"{slide_id}-*"):  # an attempt killed before it finished
        shutil.rmtree(stale, ignore_errors=True)
    slide = wsi.open_slide(path)
    um_px, source = wsi.spacing(path, options.spacing_um_px)
    segmented = wsi.segment(slide, path, um_px, model)
    stage = out / WORK / f"{slide_id}-{os.getpid()}"
    try:
        inference_started = time.perf_counter()
        table = wsi.infer(
            path, segmented, model, stage, options.batch_size, options.num_workers,
            options.speedup, model_threads(options),
        )  # fmt: skip
        inference_seconds = time.perf_counter() - inference_started
        probabilities = table.filter(like="prob_").to_numpy()[:, 0]
        results = stage / "results"
        for folder, suffix in (
            (wsi.PATCHES_DIR, "h5"),
            (wsi.CSV_DIR, "csv"),
            (wsi.GEOJSON_DIR, "geojson"),
        ):
            (out / folder).mkdir(parents=True, exist_ok=True)
            os.replace(
                results / folder / f"{slide_id}.{suffix}", out / folder / f"{slide_id}.{suffix}"
            )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    thumb = segmented.thumbnail.copy()
    thumb.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE), resample=Image.Resampling.LANCZOS)
    width, height = segmented.dimensions
    scale = (width / thumb.size[0], height / thumb.size[1])
    coords = table[["minx", "miny", "width", "height"]].to_numpy()
    _write_png(
        out / HEATMAPS / f"{slide_id}.png",
        Image.fromarray(heatmap(np.asarray(thumb), coords, probabilities, scale)),
    )
    _write_png(
        out / TISSUE / f"{slide_id}.png",
        Image.fromarray(segmented.tissue.mask.astype(np.uint8) * 255),
    )
    qc = segmented.qc.copy()
    qc.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE), resample=Image.Resampling.LANCZOS)
    with atomic_path(out / wsi.MASKS_DIR / f"{slide_id}.jpg") as tmp:
        qc.save(tmp, format="JPEG")
    seconds = time.perf_counter() - started
    summary = {
        "slide_id": slide_id,
        "slide": str(path),
        # Absolute: `pcam drift OUT/patches/ID.h5` reads the patches from it, from anywhere.
        "slide_path": str(path.resolve()),
        "status": "done",
        "width": width,
        "height": height,
        "um_px": um_px,
        "spacing_from": source,
        "threshold_from": cut[1],
        **summarise(
            probabilities, segmented.patch_px, um_px, segmented.tissue, cut[0], options.top_k
        ),
        "seconds": round(seconds, 3),
        # WSInfer's reading, transforms and model over the patches (not segmentation or outputs)
        "inference_seconds": round(inference_seconds, 3),
        "patches_per_s": round(len(probabilities) / inference_seconds, 3),
        "outputs": {
            "csv": f"{wsi.CSV_DIR}/{slide_id}.csv",
            "geojson": f"{wsi.GEOJSON_DIR}/{slide_id}.geojson",
            "heatmap": f"{HEATMAPS}/{slide_id}.png",
            "tissue_mask": f"{TISSUE}/{slide_id}.png",
            "contours": f"{wsi.MASKS_DIR}/{slide_id}.jpg",
            "patches": f"{wsi.PATCHES_DIR}/{slide_id}.h5",
        },
    }
    (out / ERRORS / f"{slide_id}.json").unlink(missing_ok=True)
    write_json(out / SUMMARIES / f"{slide_id}.json", summary)
    return summary


def row(out: Path, slide: Path) -> dict[str, Any]:
    """A slide's line of the cohort table, from its summary or its error."""
    for folder in (SUMMARIES, ERRORS):
        path = out / folder / f"{slide.stem}.json"
        if path.is_file():
            record = read_json(path)
            return {column: record.get(column) for column in COLUMNS}
    return {column: None for column in COLUMNS} | {
        "slide_id": slide.stem, "slide": str(slide), "status": "pending"
    }  # fmt: skip


def write_cohort(out: Path, slides: list[Path]) -> list[dict[str, Any]]:
    rows = [row(out, slide) for slide in slides]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / f"{COHORT}.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(out / f"{COHORT}.json", rows)
    return rows


def main(
    source: Path,
    out: Path,
    options: Options,
    part: tuple[int, int] | None = None,
    cohort_only: bool = False,
) -> None:
    """Score the slides of `source` (the `part` = (index, size) group of them: one Slurm array
    task's share), then write the cohort table of all of them unless scoring only a part.
    `cohort_only`: no scoring, the table of what is there (the array's last job).
    Raises PipelineError naming the slides that failed or were never scored."""
    slides = slide_list(source)
    mine = chunk(slides, *part) if part else slides
    out.mkdir(parents=True, exist_ok=True)
    if not cohort_only:
        model = wsi.load_model(options.model_dir)
        cut = threshold(options)
        with StopFlag() as stop:
            for path in tqdm(mine, desc="slides", unit="slide"):
                if (out / SUMMARIES / f"{path.stem}.json").is_file():
                    log.info(
                        "%s: finished before (%s/%s.json): skipped", path, SUMMARIES, path.stem
                    )
                    continue
                if stop.signal is not None:
                    raise Preempted(f"stopped before {path}: the finished slides are kept")
                try:
                    score_slide(path, out, model, options, cut)
                except Exception as exc:  # one bad slide must not stop the cohort
                    # A PipelineError names the slide and the fix; anything else gets its type.
                    message = (
                        str(exc)
                        if isinstance(exc, PipelineError)
                        else f"{path}: {type(exc).__name__}: {exc}"
                    )
                    log.error("%s", message)
                    write_json(
                        out / ERRORS / f"{path.stem}.json",
                        {
                            "slide_id": path.stem,
                            "slide": str(path),
                            "status": "failed",
                            "error": message,
                        },
                    )
        # Empty once every slide in hand is done; another array task recreates it if it needs it.
        with contextlib.suppress(OSError):
            (out / WORK).rmdir()
    rows = [row(out, path) for path in mine] if part else write_cohort(out, slides)
    bad = [r for r in rows if r["status"] != "done"]
    if bad:
        # Each error names its slide (and the fix, where there is one).
        names = "; ".join(r["error"] or f"{r['slide']}: not scored yet" for r in bad)
        table = "" if part else f" (table: {out / COHORT}.csv)"
        raise PipelineError(f"{len(bad)} of {len(rows)} slide(s) not scored{table}: {names}")
