"""The PatchCamelyon file format: names, shapes, the published checksums, blank patches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np

SPLITS: tuple[str, ...] = ("train", "valid", "test")
Split = Literal["train", "valid", "test"]
Part = Literal["x", "y"]

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


# md5 of each unpacked .h5 (what data.dvc pins) and of each .gz as served by Zenodo record 2546921.
PUBLISHED_H5_MD5: dict[str, str] = {
    "camelyonpatch_level_2_split_train_x.h5": "01844da899645b4d6f84946d417ba453",
    "camelyonpatch_level_2_split_train_y.h5": "0781386bf6c2fb62d58ff18891466aca",
    "camelyonpatch_level_2_split_valid_x.h5": "81cf9680f1724c40673f10dc88e909b1",
    "camelyonpatch_level_2_split_valid_y.h5": "94d8aacc249253159ce2a2e78a86e658",
    "camelyonpatch_level_2_split_test_x.h5": "2614b2e6717d6356be141d9d6dbfcb7e",
    "camelyonpatch_level_2_split_test_y.h5": "11ed647efe9fe457a4eb45df1dba19ba",
}
PUBLISHED_GZ_MD5: dict[str, str] = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
}


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


def checksums_from(path: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(h5 md5s, gz md5s): the published ones, or those of an md5sum file (both kinds in one)."""
    if path is None:
        return dict(PUBLISHED_H5_MD5), dict(PUBLISHED_GZ_MD5)
    table = read_checksum_file(Path(path))
    h5 = {name: md5 for name, md5 in table.items() if name.endswith(".h5")}
    gz = {name: md5 for name, md5 in table.items() if name.endswith(".h5.gz")}
    return h5, gz
