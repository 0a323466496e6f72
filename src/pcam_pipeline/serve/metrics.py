"""What the server tells Prometheus at /metrics: requests by route and status, latency, batch
sizes, queue depth, the model's identity, the process (RSS, CPU), and per-request statistics of
the patches sent (channel means, blank fraction) for drift monitoring against the training data."""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CHANNEL_BUCKETS = tuple(float(v) for v in range(16, 256, 16))
FRACTION_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# A pixel is tissue when its channels spread by more than this (stained tissue is coloured,
# glass and background are grey-white); a patch with under TISSUE_SHARE tissue pixels is blank.
TISSUE_SPREAD = 20
TISSUE_SHARE = 0.1
STRIDE = 4  # statistics on every 4th pixel each way: 1/16 of the work, the same means to ~1%


def input_statistics(patches: np.ndarray) -> tuple[np.ndarray, float]:
    """(mean of each RGB channel in 0..255, fraction of blank patches) of uint8 (N,96,96,3)."""
    sample = patches[:, ::STRIDE, ::STRIDE, :]
    means = sample.mean(axis=(0, 1, 2))
    spread = sample.max(axis=3).astype(np.int16) - sample.min(axis=3)
    tissue = (spread > TISSUE_SPREAD).mean(axis=(1, 2))
    return means, float((tissue < TISSUE_SHARE).mean())


class ServeMetrics:
    """The server's metrics, in a registry of its own (no process-global state)."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "pcam_requests",
            "Requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "pcam_request_seconds", "Time to answer a request, by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch = Histogram(
            "pcam_batch_patches", "Patches in each batch the model ran",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Gauge("pcam_queue_patches", "Patches waiting for a batch", registry=r)
        self.patches = Counter("pcam_patches", "Patches scored", registry=r)
        self.channel_mean = Histogram(
            "pcam_input_channel_mean", "Per request: mean of each RGB channel (0..255)",
            ["channel"], buckets=CHANNEL_BUCKETS, registry=r,
        )  # fmt: skip
        self.blank_fraction = Histogram(
            "pcam_input_blank_fraction", "Per request: fraction of patches with under 10% tissue",
            buckets=FRACTION_BUCKETS, registry=r,
        )  # fmt: skip
        shown = ("name", "version", "precision", "md5", "commit")
        Info("pcam_model", "The model served", registry=r).info(
            {key: str(identity.get(key)) for key in shown}
        )

    def observe_inputs(self, patches: np.ndarray) -> None:
        means, blank = input_statistics(patches)
        for channel, mean in zip("rgb", means, strict=True):
            self.channel_mean.labels(channel).observe(float(mean))
        self.blank_fraction.observe(blank)
        self.patches.inc(len(patches))
