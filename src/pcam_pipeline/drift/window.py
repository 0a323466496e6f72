"""The server's drift detector: image features of sampled patches of the requests, and the
model's confidence in them, kept over a rolling window and tested against the reference.

The features cost about a millisecond a patch, in the request's path: at most `rate` patches a
second are sampled (a token bucket holding one second's worth), so the window's CPU cost is
bounded whatever the request rate, and a burst of requests does not slow each of them.

`pcam serve` has no torch, so no embeddings: the window is tested on the image features and
the confidences (which the served ONNX model gives) only. The tests run when asked (on a
/metrics scrape) and only if the window changed since the last run.
"""

from __future__ import annotations

import time

import numpy as np

from pcam_pipeline.drift.detector import Correction, DriftReport, Sample, detect
from pcam_pipeline.drift.features import FEATURES, patch_features
from pcam_pipeline.drift.profile import CONFIDENCE, Reference, confidence

COLUMNS = (*FEATURES, CONFIDENCE)


class DriftWindow:
    """The last `size` sampled patches' features and confidences (a ring buffer), sampled at
    most `rate` patches a second."""

    def __init__(
        self,
        reference: Reference,
        size: int,
        rate: float,
        min_patches: int,
        alpha: float,
        correction: Correction,
    ) -> None:
        self.reference, self.size, self.rate = reference, size, rate
        self.tokens, self.refilled = rate, time.monotonic()  # a full bucket: one second's worth
        self.min_patches, self.alpha, self.correction = min_patches, alpha, correction
        self.values = np.zeros((size, len(COLUMNS)))
        self.count = 0  # patches ever added; the window holds the last min(count, size)
        self.tested_at = -1
        self.last: DriftReport | None = None

    def observe(
        self, patches: np.ndarray, probabilities: np.ndarray, now: float | None = None
    ) -> None:
        """Keep as many patches of a request as the bucket allows, evenly spaced through it."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.rate, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        kept = min(len(patches), int(self.tokens))
        if kept == 0:
            return
        self.tokens -= kept
        spaced = np.linspace(0, len(patches) - 1, kept)
        take = np.unique(spaced.round().astype(int))
        table = patch_features(patches[take], self.reference.stain_vectors).values
        rows = np.column_stack([table, confidence(np.asarray(probabilities)[take])])
        for row in rows:
            self.values[self.count % self.size] = row
            self.count += 1

    @property
    def held(self) -> int:
        return min(self.count, self.size)

    def report(self) -> DriftReport | None:
        """The tests over the window (None before it holds `min_patches`), cached until it
        changes."""
        if self.held < self.min_patches:
            return None
        if self.tested_at != self.count:
            window = self.values[: self.held]
            sample = Sample({name: window[:, i] for i, name in enumerate(COLUMNS)})
            self.last = detect(
                self.reference.sample(with_confidence=True, with_embeddings=False),
                sample,
                self.alpha,
                self.correction,
                permutations=1,
                seed=0,
            )
            self.tested_at = self.count
        return self.last
