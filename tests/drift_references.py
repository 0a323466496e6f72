"""The drift tests' reference of image features: shared by tests/drift/test_drift.py and the slide
tests' drift check (tests/slides/test_slides.py), so that both test against the same reference."""

from __future__ import annotations

import numpy as np

from pcam_pipeline.drift import features, profile
from pcam_pipeline.drift.profile import Reference

REFERENCE_PATCHES = 768


def image_reference(patches: np.ndarray) -> Reference:
    """A reference of image features only (no model), as drift_reference writes its first half."""
    vectors = features.macenko_vectors(patches)
    table = features.patch_features(patches, vectors)
    meta = {"version": profile.FORMAT_VERSION, "features": list(features.FEATURES)}
    return Reference(
        features=table.values.astype(np.float32),
        confidence=np.zeros(0, dtype=np.float32),
        embeddings=np.zeros((0, 0), dtype=np.float32),
        stain_vectors=vectors,
        meta={**meta, "model_md5": None},
    )
