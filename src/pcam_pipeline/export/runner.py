#!/usr/bin/env python3
"""Score PCAM patches with the exported model, on a machine with only Python, numpy, pillow and
onnxruntime (`pip install -r requirements.txt` beside this file). No torch, no pipeline.

    python pcam_runner.py INPUT... --out scores.csv [--model model.onnx] [--threshold T]

INPUT: 96x96 RGB patch images (PNG, TIFF) or folders of them, scored in name order; or HDF5
files with PCAM's dataset `x` (N, 96, 96, 3) uint8, which needs h5py as well. The CSV has a row
per patch: its name, the probability of tumour, and the decision at the model card's threshold
(chosen on the validation split) unless --threshold says otherwise. The preprocessing is inside
the model, so the probabilities are those `pcam predict` gives for the same patches.

Exit codes: 0 done, 2 bad input (the message names the file and the fix).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PATCH = (96, 96, 3)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "TIFF")
HDF5_SUFFIXES = (".h5", ".hdf5")
BATCH = 256


class BadInput(Exception):
    """An input the runner cannot score; the message names it and the fix."""


def decode_patch(data: bytes, name: str, formats: tuple[str, ...] = IMAGE_FORMATS) -> np.ndarray:
    """One 96x96 8-bit RGB(A) image of `formats` (PNG or TIFF; `pcam drift` adds JPEG) as uint8
    (96, 96, 3), alpha dropped as `pcam predict` drops it. The header is checked before any
    pixel is decoded, so an image of other dimensions (a decompression bomb among them) is
    refused unread; `pcam serve` decodes uploads with it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            if (height, width) != PATCH[:2]:
                raise BadInput(f"{name}: {width}x{height} pixels, expected 96x96 (a PCAM patch)")
            if image.mode not in ("RGB", "RGBA") or any("16" in raw_mode(t) for t in image.tile):
                depth = "16-bit " if image.mode in ("RGB", "RGBA") else ""
                raise BadInput(f"{name}: mode {depth}{image.mode}, expected an 8-bit RGB(A) patch")
            image.load()
            pixels = np.asarray(image)[..., :3]
    except Image.DecompressionBombError as exc:
        raise BadInput(f"{name}: {exc}; expected 96x96 pixels (a PCAM patch)") from None
    except UnidentifiedImageError:
        raise BadInput(
            f"{name}: not a readable image (not {' or '.join(formats)}); give 96x96 RGB "
            f"{' or '.join(formats)}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(
            f"{name}: not a readable image ({exc}); give 96x96 RGB {' or '.join(formats)}"
        ) from None
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def raw_mode(tile: object) -> str:
    """The raw pixel layout of one tile of an opened image ("RGB", "RGB;16B", ...)."""
    args = getattr(tile, "args", None)
    return args if isinstance(args, str) else str(args[0] if args else "")


def read_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read ({exc.strerror})") from None
    return decode_patch(data, str(path))


def hdf5_blocks(path: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    try:
        import h5py
    except ImportError:
        raise BadInput(f"{path}: reading HDF5 needs h5py (pip install h5py)") from None
    with h5py.File(path, "r") as handle:
        if "x" not in handle or handle["x"].shape[1:] != PATCH:
            raise BadInput(f"{path}: expected dataset 'x' of shape (N, 96, 96, 3)")
        x = handle["x"]
        for start in range(0, x.shape[0], BATCH):
            block = np.asarray(x[start : start + BATCH], dtype=np.uint8)
            yield [f"{path}[{i}]" for i in range(start, start + len(block))], block


def blocks(inputs: list[Path]) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, uint8 patches) in the order given; a folder's images in name order."""
    images: list[Path] = []

    def flush() -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            yield [str(p) for p in chunk], np.stack([read_image(p) for p in chunk])
        images.clear()

    for path in inputs:
        if path.is_dir():
            images.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.suffix.lower() in HDF5_SUFFIXES:
            yield from flush()
            yield from hdf5_blocks(path)
        elif path.is_file():
            images.append(path)
        else:
            raise BadInput(f"{path}: no such file or folder")
    yield from flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="CSV of per-patch results")
    parser.add_argument("--model", type=Path, default=HERE / "model.onnx")
    parser.add_argument("--card", type=Path, default=HERE / "model_card.json")
    parser.add_argument("--threshold", type=float, help="default: the model card's")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    threshold = args.threshold
    if threshold is None:
        threshold = json.loads(args.card.read_text())["metrics"]["threshold"]["value"]
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patch", "probability", "prediction"])
            count = 0
            for names, patches in blocks(args.inputs):
                probs = session.run([output_name], {input_name: patches})[0]
                for name, prob in map(lambda n, p: (n, float(p)), names, probs):
                    writer.writerow([name, f"{prob:.6f}", int(prob >= threshold)])
                count += len(names)
        os.replace(tmp, args.out)  # a complete CSV or none
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        tmp.unlink(missing_ok=True)
    print(f"scored {count} patches -> {args.out} (threshold {threshold:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
