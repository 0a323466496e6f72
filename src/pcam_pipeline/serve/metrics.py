"""What the server tells Prometheus at /metrics: requests by route and status, latency, batch
sizes, queue depth, the model's identity, the process (RSS, CPU), and per-request statistics of
the patches sent (channel means, blank fraction), and, with a drift reference, the drift
tests over a rolling window of requests (pcam_drift_*; docs/drift.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

from pcam_pipeline.drift.features import blank_fraction, tissue_fraction

if TYPE_CHECKING:
    from pcam_pipeline.drift.window import DriftWindow

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CHANNEL_BUCKETS = tuple(float(v) for v in range(16, 256, 16))
FRACTION_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
STRIDE = 4  # statistics on every 4th pixel each way: 1/16 of the work, the same means to ~1%


def input_statistics(patches: np.ndarray) -> tuple[np.ndarray, float]:
    """(mean of each RGB channel in 0..255, fraction of blank patches) of uint8 (N,96,96,3)."""
    means = patches[:, ::STRIDE, ::STRIDE, :].mean(axis=(0, 1, 2))
    return means, blank_fraction(tissue_fraction(patches, STRIDE))


class ServeMetrics:
    """The server's metrics, in a registry of its own (no process-global state)."""

    def __init__(self, identity: dict[str, Any], drift: DriftWindow | None = None) -> None:
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
        self.drift = drift
        self.drift_detected = Gauge(
            "pcam_drift_detected",
            "1 when the window of recent patches drifted from the training data (corrected tests "
            "at the reference's alpha), 0 when not; absent without a reference",
            registry=r,
        )
        self.drift_min_pvalue = Gauge(
            "pcam_drift_min_pvalue", "Smallest uncorrected p-value of the drift tests", registry=r
        )
        self.drift_pvalue = Gauge(
            "pcam_drift_pvalue", "Each drift test's p-value, corrected for the number of tests",
            ["feature"], registry=r,
        )  # fmt: skip
        self.drift_window = Gauge(
            "pcam_drift_window_patches", "Patches in the drift window", registry=r
        )
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

    def observe_scored(self, patches: np.ndarray, probabilities: np.ndarray) -> None:
        if self.drift is not None:
            self.drift.observe(patches, probabilities)

    def refresh_drift(self) -> None:
        """Run the drift tests over the window if it changed (on a scrape): NaN until it holds
        enough patches."""
        if self.drift is None:
            return
        self.drift_window.set(self.drift.held)
        report = self.drift.report()
        if report is None:
            self.drift_detected.set(float("nan"))
            self.drift_min_pvalue.set(float("nan"))
            return
        self.drift_detected.set(float(report.drift))
        self.drift_min_pvalue.set(report.min_p_value)
        for test in report.tests:
            self.drift_pvalue.labels(test.name).set(test.p_adjusted)
