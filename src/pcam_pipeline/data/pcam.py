"""The PatchCamelyon file format: names, shapes, checksum files, blank patches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np

from pcam_pipeline.errors import PipelineError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
Split = Literal["train", "valid", "test"]

PATCH_SHAPE = (96, 96, 3)
PATCH_BYTES = math.prod(PATCH_SHAPE)  # one uint8 patch
LABEL_SHAPE = (1, 1, 1)


def blank_mask(x: np.ndarray, black_level: int, white_level: int) -> np.ndarray:
    """True for patches that are all black (every pixel <= black) or all white (>= white)."""
    flat = x.reshape(len(x), -1)
    return (flat.max(axis=1) <= black_level) | (flat.min(axis=1) >= white_level)


def file_name(split: str, part: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_{part}.h5"


def split_files(directory: Path, split: str) -> tuple[Path, Path]:
    return directory / file_name(split, "x"), directory / file_name(split, "y")


def all_file_names() -> list[str]:
    return [file_name(split, part) for split in SPLITS for part in ("x", "y")]


def read_checksum_file(path: Path) -> dict[str, str]:
    """Parse an md5sum-format file (`<md5>  <name>` per line) into {name: md5}."""
    checksums: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise ValueError(
                f"{path}:{number}: expected '<32-hex md5>  <file name>', found {line!r}"
            )
        checksums[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return checksums


def checksums_from(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """(h5 md5s, gz md5s) of an md5sum-format file holding both kinds (fetch.checksums: the
    published release's in data/pcam.md5, or a mirror's)."""
    try:
        table = read_checksum_file(Path(path))
    except OSError as exc:
        raise PipelineError(
            f"fetch.checksums: {path} cannot be read ({exc.strerror}). Fix: point "
            "fetch.checksums in params.yaml at an md5sum-format file (data/pcam.md5 holds the "
            "published release's)"
        ) from None
    except ValueError as exc:
        raise PipelineError(
            f"fetch.checksums: {exc}. Fix: one `<md5>  <file name>` per line, as md5sum prints"
        ) from None
    h5 = {name: md5 for name, md5 in table.items() if name.endswith(".h5")}
    gz = {name: md5 for name, md5 in table.items() if name.endswith(".h5.gz")}
    return h5, gz
