"""`python -m pcam_pipeline.perf.slide_scoring`: `pcam slides` on a generated 50,000 x 50,000 slide,
its peak memory and its patches/s beside the same patches through ONNX Runtime and TorchScript
in-process (docs/slides.md).

The slide is a pyramidal, tiled (256 x 256) BigTIFF at 1 um/px written tile by tile (tifffile
takes an iterator of tiles), so generating it never holds more than a tile and a patch bank:
grey glass, and a disc of tissue covering `--tissue-fraction` of the slide, filled with the
synthetic generator's patches (src/pcam_pipeline/data/synthetic.py) on WSInfer's 96 px grid.
The levels below level 0 (downsamples 4, 16, 64) sample the same picture, so the thumbnail
WSInfer segments is the slide's.

`pcam slides` runs as a child process; its peak RSS is that child's maximum resident set (its
own rusage, from wait4), which the generation here in the parent does not enter. The child is
forked by a small launcher, not by this process: Linux keeps the memory a process held before
exec in its ru_maxrss, and a child forked from a 2 GB test runner would report 2 GB. Then up to
`--compare` of the patches it scored are read back into memory and timed through the exported
ONNX graph (models/export/model.onnx, uint8 in) and the WSInfer TorchScript, in batches of the
same size: no reading, no decoding, no transforms; each at its default threads and at one (on two
cores, one thread can be the faster), the ratio against ONNX Runtime's faster setting. The
report (reports/slides-bench.json) has the machine, the command and both ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.paths import EXPORT_DIR
from pcam_pipeline.repro import atomic_path, write_json

TILE = 256
PATCH = 96
DOWNSAMPLES = (4, 16, 64)
GLASS = 240
BANK = 256  # distinct tissue patches, repeated over the disc
BATCH = 64  # pcam slides' default batch size
REPORT = Path("reports/slides-bench.json")
MEMORY_GOAL_MB = 2048
SPEED_GOAL = 0.7
SAMPLE_S = 0.25  # memory sampling period of the scoring process tree
# Runs argv[1:] as its child and prints [exit code, the child's own ru_maxrss in KiB]. It imports
# nothing heavy, so the child's pre-exec memory (counted in its ru_maxrss) is a few MB. The
# child's stdout goes to stderr: the launcher's stdout carries the result alone.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.dup2(2, 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))
"""


class Picture:
    """The slide's level-0 picture as a function: glass, and a disc of synthetic tissue."""

    def __init__(self, size: int, fraction: float, seed: int = 0) -> None:
        self.size = size
        self.centre = size / 2
        self.radius = float(np.sqrt(fraction * size * size / np.pi))
        self.bank, _ = generate_split(seed, "test", BANK, positive_fraction=0.5)

    def tile(self, x0: int, y0: int, downsample: int) -> np.ndarray:
        """The (TILE, TILE, 3) tile whose top-left is (x0, y0) at a level of `downsample`:
        level-0 pixels sampled at the tile's pixel corners (nearest)."""
        xs = (x0 + np.arange(TILE)) * downsample
        ys = (y0 + np.arange(TILE)) * downsample
        # The tile's nearest point to the disc's centre: beyond the radius, the tile is glass.
        dx = max(xs[0] - self.centre, 0.0, self.centre - xs[-1])
        dy = max(ys[0] - self.centre, 0.0, self.centre - ys[-1])
        out = np.full((TILE, TILE, 3), GLASS, dtype=np.uint8)
        if dx * dx + dy * dy > self.radius**2:  # wholly glass: most tiles of the slide
            return out
        inside = ((xs[None, :] - self.centre) ** 2 + (ys[:, None] - self.centre) ** 2) <= (
            self.radius**2
        )
        inside &= (xs[None, :] < self.size) & (ys[:, None] < self.size)
        which = (xs[None, :] // PATCH * 7 + ys[:, None] // PATCH * 13) % BANK
        pixels = self.bank[which, ys[:, None] % PATCH, xs[None, :] % PATCH]
        out[inside] = pixels[inside]
        return out

    def tiles(self, downsample: int) -> Iterator[np.ndarray]:
        side = -(-self.size // downsample)
        for y0 in range(0, side, TILE):
            for x0 in range(0, side, TILE):
                yield self.tile(x0, y0, downsample)


def write_slide(path: Path, size: int, fraction: float) -> Path:
    """The BigTIFF pyramid at 1 um/px, tile by tile (SubIFDs, as tests/slide_files.py writes)."""
    import tifffile

    picture = Picture(size, fraction)
    options: dict[str, Any] = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "zlib",
        "compressionargs": {"level": 1},
        "resolutionunit": "CENTIMETER",
        "dtype": np.uint8,
    }
    per_cm = 1e4  # 1 um/px
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(
            picture.tiles(1),
            shape=(size, size, 3),
            subifds=len(DOWNSAMPLES),
            resolution=(per_cm, per_cm),
            **options,
        )
        for factor in DOWNSAMPLES:
            side = -(-size // factor)
            tif.write(
                picture.tiles(factor),
                shape=(side, side, 3),
                subfiletype=1,
                resolution=(per_cm / factor, per_cm / factor),
                **options,
            )
    return path


def score_in_child(slides: Path, out: Path, model_dir: Path, card: Path) -> dict[str, Any]:
    """`pcam slides` in a child process: its wall time, its peak RSS (MB) and the peak of its
    process tree's summed PSS (its patch reader is a second process; PSS counts the pages they
    share once), sampled every SAMPLE_S."""
    import psutil

    command = [
        sys.executable, "-m", "pcam_pipeline.cli", "slides", str(slides), "--out", str(out),
        "--model-dir", str(model_dir), "--card", str(card),
    ]  # fmt: skip
    started = time.perf_counter()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE)
    launcher_process, tree_peak = psutil.Process(launcher.pid), 0.0
    while launcher.poll() is None:
        with contextlib.suppress(psutil.Error):  # the launcher ended while we looked
            tree_peak = max(tree_peak, _tree_pss_mb(launcher_process.children(recursive=True)))
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - started
    assert launcher.stdout is not None
    returncode, maxrss_kib = json.loads(launcher.stdout.read())
    if launcher.returncode or returncode:
        raise subprocess.CalledProcessError(returncode or launcher.returncode, command)
    peak_mb = maxrss_kib / 1024  # KiB on Linux
    return {
        "command": " ".join(command[1:]),
        "wall_seconds": seconds,
        "peak_rss_mb": peak_mb,
        "peak_tree_pss_mb": tree_peak,
    }


def _tree_pss_mb(processes: list[Any]) -> float:
    import psutil

    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # it ended while we looked
            total += process.memory_full_info().pss
    return total / 2**20


def read_patches(slide: Path, csv: Path, count: int) -> np.ndarray:
    """Up to `count` of the scored patches (evenly spread over the CSV), read as WSInfer does."""
    import pandas as pd
    import tiffslide

    table = pd.read_csv(csv)
    rows = table.iloc[np.linspace(0, len(table) - 1, min(count, len(table))).astype(int)]
    with tiffslide.TiffSlide(slide) as reader:
        return np.stack(
            [
                np.asarray(reader.read_region((x, y), 0, (w, h)).convert("RGB"))
                for x, y, w, h in zip(rows.minx, rows.miny, rows.width, rows.height, strict=True)
            ]
        )


def in_process_rates(patches: np.ndarray, export_dir: Path, model_dir: Path) -> dict[str, float]:
    """Patches/s of the ONNX graph (uint8 in; ONNX Runtime's default threads, one per core, and
    one thread) and of the WSInfer TorchScript (normalised float in, prepared beforehand; as
    loaded at torch's default threads, and optimised as `pcam slides` runs it, WSInfer's
    `jit_compile`, on one thread) over in-memory batches of BATCH, best of three passes."""
    import torch
    from wsinfer.modellib.models import jit_compile

    from pcam_pipeline.export.onnx_model import onnx_probabilities, session

    onnx = session(export_dir / "model.onnx")
    onnx_single = session(export_dir / "model.onnx", threads=1)
    config = json.loads((model_dir / "config.json").read_text())
    norm = next(t["arguments"] for t in config["transform"] if t["name"] == "Normalize")
    scripted = torch.jit.load(str(model_dir / "torchscript_model.pt")).eval()
    optimised = jit_compile(scripted)
    floats = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    floats = (floats - torch.tensor(norm["mean"])[:, None, None]) / torch.tensor(norm["std"])[
        :, None, None
    ]
    blocks = [patches[i : i + BATCH] for i in range(0, len(patches), BATCH)]
    tensors = [floats[i : i + BATCH] for i in range(0, len(floats), BATCH)]

    def run_onnx(model: object = onnx) -> None:
        onnx_probabilities(model, blocks)

    def run_torchscript(model: Any = scripted, threads: int | None = None) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            with torch.no_grad():
                for batch in tensors:
                    torch.sigmoid(model(batch))
        finally:
            torch.set_num_threads(before)

    engines = {
        "onnxruntime": run_onnx,
        "onnxruntime_1_thread": lambda: run_onnx(onnx_single),
        "torchscript": run_torchscript,
        "torchscript_optimised_1_thread": lambda: run_torchscript(optimised, 1),
    }
    rates = {}
    for name, engine in engines.items():
        engine()  # warm-up
        best = min(_seconds(engine) for _ in range(3))
        rates[name] = len(patches) / best
    return rates


def _seconds(engine: Any) -> float:
    started = time.perf_counter()
    engine()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000, help="slide side in pixels [50000]")
    parser.add_argument(
        "--tissue-fraction", type=float, default=0.05, help="share of the slide that is tissue"
    )
    parser.add_argument("--compare", type=int, default=4096, help="patches timed in-process")
    parser.add_argument("--work", type=Path, default=Path("build/slides-bench"))
    parser.add_argument("--export-dir", type=Path, default=EXPORT_DIR)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    from pcam_pipeline.bench.environment import environment

    shutil.rmtree(args.work, ignore_errors=True)
    slides = args.work / "slides"
    slides.mkdir(parents=True)
    started = time.perf_counter()
    slide = write_slide(slides / "large.tif", args.size, args.tissue_fraction)
    generated = time.perf_counter() - started
    model_dir = args.export_dir / "wsinfer"
    scored = score_in_child(
        slides, args.work / "out", model_dir, args.export_dir / "model_card.json"
    )
    summary = json.loads((args.work / "out" / "summaries" / "large.json").read_text())
    patches = read_patches(slide, args.work / "out" / summary["outputs"]["csv"], args.compare)
    rates = in_process_rates(patches, args.export_dir, model_dir)
    report = {
        "slide": {
            "size_px": args.size,
            "tissue_fraction": args.tissue_fraction,
            "file_mb": slide.stat().st_size / 1e6,
            "generation_seconds": generated,
        },
        "pcam_slides": {
            **scored,
            "patches": summary["patches"],
            "inference_seconds": summary["inference_seconds"],
            "patches_per_s": summary["patches_per_s"],
            "tissue_area_mm2": summary["tissue_area_mm2"],
        },
        "in_process_patches_per_s": rates,
        "compared_patches": len(patches),
        # Against ONNX Runtime's faster thread setting on this machine: the stricter ratio.
        "ratio_to_onnxruntime": summary["patches_per_s"]
        / max(rates["onnxruntime"], rates["onnxruntime_1_thread"]),
        "ratio_to_torchscript": summary["patches_per_s"] / rates["torchscript"],
        "goals": {"peak_rss_mb": MEMORY_GOAL_MB, "ratio": SPEED_GOAL},
        "command": " ".join(
            ["python -m pcam_pipeline.perf.slide_scoring", *(argv or sys.argv[1:])]
        ),
        "environment": environment(),
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=2))
    return report


if __name__ == "__main__":
    main()
