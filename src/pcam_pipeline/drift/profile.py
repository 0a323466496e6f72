"""The reference profile on disk: `reference.npz` (arrays) and `reference.json` (what they are),
in one directory (models/drift, beside the model; `drift/` in the export bundle).

Numpy and JSON only, read without pickle: `pcam serve` loads it without torch.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.drift.detector import Correction, Sample
from pcam_pipeline.drift.features import FEATURES
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.repro import atomic_path

ARRAYS_FILE = "reference.npz"
META_FILE = "reference.json"
FORMAT_VERSION = 1
CONFIDENCE = "confidence"  # the model's max(p, 1 - p): the name of its test
ARRAYS = ("features", "confidence", "embeddings", "stain_vectors")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip member can carry


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """How sure the model is of each patch, whichever class it says: max(p, 1 - p)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.maximum(p, 1.0 - p)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez writes, with a fixed time on every member: np.savez stamps the current
    time, so the same arrays would give another file (and another md5 in dvc.lock) each run.
    Each member is written whole (writestr): streamed with force_zip64, Python 3.11.2 (the
    image's) and 3.11.7 wrote different headers for the same arrays."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH), buffer.getvalue())


@dataclass(frozen=True)
class Reference:
    """Image features of a train-split sample, the model's confidences and embeddings on a
    held-out sample, Macenko's stain vectors of the train sample, and `meta` (reference.json:
    sizes, seed, alpha, correction, feature names, the model's md5)."""

    features: np.ndarray  # (N, len(FEATURES))
    confidence: np.ndarray  # (M,)
    embeddings: np.ndarray  # (M, D)
    stain_vectors: np.ndarray  # (2, 3): hematoxylin, eosin
    meta: dict[str, Any]

    @property
    def alpha(self) -> float:
        return float(self.meta.get("alpha", 0.05))

    @property
    def correction(self) -> Correction:
        return "bonferroni" if self.meta.get("correction") == "bonferroni" else "holm"

    def sample(self, with_confidence: bool = True, with_embeddings: bool = True) -> Sample:
        """What the tests compare an input with: every feature, the model's confidence and its
        embeddings (leave out what the input lacks: an input no model scored, or the server,
        which has confidences but no embeddings)."""
        univariate = {name: self.features[:, i] for i, name in enumerate(FEATURES)}
        if with_confidence:
            univariate[CONFIDENCE] = self.confidence
        return Sample(univariate, self.embeddings if with_embeddings else None)

    def save(self, directory: Path) -> None:
        """Both files, each written to a temporary name and renamed; the JSON last, so a
        directory holding reference.json holds its arrays."""
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / ARRAYS_FILE) as tmp:
            write_npz(tmp, {name: getattr(self, name) for name in ARRAYS})
        with atomic_path(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")


def load_reference(directory: Path) -> Reference:
    """The reference in `directory`; PipelineError naming the file and the fix otherwise."""
    fix = (
        "Fix: write it with the model (`dvc repro drift_reference`), or name the directory "
        "holding reference.json and reference.npz (--reference)"
    )
    meta_path, arrays_path = directory / META_FILE, directory / ARRAYS_FILE
    for path in (meta_path, arrays_path):
        if not path.is_file():
            raise PipelineError(f"{path}: not found. {fix}")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as arrays:
            loaded = {name: np.asarray(arrays[name]) for name in ARRAYS}
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{directory}: not a drift reference ({exc}). {fix}") from None
    if meta.get("version") != FORMAT_VERSION or meta.get("features") != list(FEATURES):
        raise PipelineError(
            f"{meta_path}: version {meta.get('version')} with features {meta.get('features')}; "
            f"this code reads version {FORMAT_VERSION} with features {list(FEATURES)}. {fix}"
        )
    return Reference(meta=meta, **loaded)
