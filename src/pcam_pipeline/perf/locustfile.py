"""Locust users for `python -m pcam_pipeline.perf.serve_load`: each sends `PCAM_LOAD_PATCHES`
uint8 patches per Open Inference Protocol request (binary tensor data, as tritonclient sends)
and checks the answer's size. Closed loop by default (the next request as soon as the last is
answered); with `PCAM_LOAD_RATE` set, each user sends that many requests a second (soak)."""

from __future__ import annotations

import os

import numpy as np
from locust import FastHttpUser, constant, constant_throughput, task

from pcam_pipeline.serve.protocol import binary_request

PATCHES = int(os.environ.get("PCAM_LOAD_PATCHES", "1"))
RATE = float(os.environ.get("PCAM_LOAD_RATE", "0"))
PIXELS = np.random.default_rng(2026).integers(0, 256, (PATCHES, 96, 96, 3), dtype=np.uint8)
BODY, HEADERS = binary_request(PIXELS, binary_output=True)


class PatchClient(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)

    @task
    def infer(self) -> None:
        with self.client.post(
            "/v2/models/pcam/infer", data=BODY, headers=HEADERS, name="infer", catch_response=True
        ) as response:
            length = int(response.headers.get("inference-header-content-length") or -1)
            if response.status_code != 200 or len(response.content) - length != 4 * PATCHES:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
