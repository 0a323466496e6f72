"""The server's drift window in-process (as tests/serve/test_app.py runs the app): requests
from the training distribution leave pcam_drift_detected at 0, brightened ones set it to 1;
the reference is found beside the export and refused when it belongs to another model."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.drift.features import FEATURES, macenko_vectors, patch_features
from pcam_pipeline.drift.profile import FORMAT_VERSION, Reference, confidence
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.serve.app import Limits, create_app
from pcam_pipeline.serve.batching import Batcher
from pcam_pipeline.serve.metrics import ServeMetrics
from pcam_pipeline.serve.model import ServedModel, load_model
from pcam_pipeline.serve.server import ServeOptions, drift_window, reference_dir
from tests.serving import call, infer_binary
from tests.tiny_pipeline import small_run_params

WINDOW = {"drift_window": 96, "drift_patches_per_s": 1e6, "drift_min_patches": 48}


def read_x(path: Path) -> np.ndarray:
    with h5py.File(path) as handle:
        return handle["x"][:]


@pytest.fixture(scope="module")
def served_with_drift(served: Path, tiny_data: Path, tmp_path_factory) -> Path:
    """A copy of the served export with drift/ in it: the tiny train split's features and the
    served model's confidences on the valid split (what drift_reference writes, without torch)."""
    export = tmp_path_factory.mktemp("served-drift") / "export"
    shutil.copytree(served / "models" / "export", export)
    model = load_model(export, "fp32", "cpu", 1)
    train, valid = read_x(tiny_data / "train.h5"), read_x(tiny_data / "valid.h5")
    vectors = macenko_vectors(train)
    Reference(
        features=patch_features(train, vectors).values,
        confidence=confidence(model.probabilities(valid)),
        embeddings=np.zeros((len(valid), 1), dtype=np.float32),
        stain_vectors=vectors,
        meta={
            "version": FORMAT_VERSION,
            "features": list(FEATURES),
            "alpha": 0.05,
            "correction": "holm",
            "model_md5": model.identity["checkpoint_md5"],
        },
    ).save(export / "drift")
    return export


def scrape(model: ServedModel, metrics: ServeMetrics, batches: list[np.ndarray]) -> bytes:
    """Send each batch as one binary infer request, then GET /metrics: its body."""
    batcher = Batcher(model.probabilities, 64, 0.002, metrics.queue.set, metrics.batch.observe)
    app = create_app(model, metrics, batcher, Limits(8 << 20, 64), None)

    async def scenario() -> bytes:
        batcher.start()
        try:
            for batch in batches:
                body, headers = infer_binary(batch)
                status, _, _ = await call(app, "POST", "/v2/models/pcam/infer", body, headers)
                assert status == 200
            return (await call(app, "GET", "/metrics"))[2]
        finally:
            await batcher.stop()

    return asyncio.run(scenario())


def test_the_window_raises_the_gauge_on_drift_only(served_with_drift: Path, tiny_data: Path):
    params = small_run_params(serve=WINDOW).serve
    options = ServeOptions(served_with_drift, "cpu", 1, None)
    model = load_model(served_with_drift, "fp32", "cpu", 1)
    test = read_x(tiny_data / "test.h5")
    brighter = np.clip(test.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)
    seen = {}
    for name, patches in (("calm", test), ("bright", brighter)):
        metrics = ServeMetrics(model.identity, drift_window(params, options, model.identity))
        assert b"pcam_drift_detected NaN" in scrape(model, metrics, [patches[:16]])  # too few
        body = scrape(model, metrics, [patches[i : i + 16] for i in range(16, 64, 16)])
        seen[name] = metrics.registry.get_sample_value("pcam_drift_detected")
        assert metrics.registry.get_sample_value("pcam_drift_window_patches") == 64
        assert b'pcam_drift_pvalue{feature="confidence"}' in body
        assert 0 <= metrics.registry.get_sample_value("pcam_drift_min_pvalue") <= 1
    assert seen == {"calm": 0.0, "bright": 1.0}


def test_the_reference_is_found_beside_the_export_or_refused(served_with_drift: Path, tmp_path):
    params = small_run_params(serve=WINDOW).serve
    identity = {"checkpoint_md5": "0" * 32}
    beside = tmp_path / "models"
    shutil.copytree(served_with_drift / "drift", beside / "drift")
    (beside / "export").mkdir()
    assert reference_dir(ServeOptions(beside / "export", "cpu", 1, None)) == beside / "drift"
    assert reference_dir(ServeOptions(tmp_path, "cpu", 1, None)) is None
    assert drift_window(params, ServeOptions(tmp_path, "cpu", 1, None), identity) is None
    off = small_run_params(serve={**WINDOW, "drift_window": 0}).serve
    assert drift_window(off, ServeOptions(served_with_drift, "cpu", 1, None), identity) is None
    with pytest.raises(PipelineError, match="written with checkpoint md5"):
        drift_window(params, ServeOptions(served_with_drift, "cpu", 1, None), identity)


def test_the_window_samples_at_most_its_rate(served_with_drift: Path, tiny_data: Path):
    """A token bucket of one second's worth: a burst keeps `rate` patches, then one a 1/rate s;
    the CPU the features take stays bounded whatever the request rate."""
    from pcam_pipeline.drift.profile import load_reference
    from pcam_pipeline.drift.window import DriftWindow

    window = DriftWindow(load_reference(served_with_drift / "drift"), 96, 8.0, 4, 0.05, "holm")
    patches = read_x(tiny_data / "valid.h5")[:20]
    probabilities = np.full(len(patches), 0.5)
    start = window.refilled
    window.observe(patches, probabilities, now=start)
    assert window.held == 8  # the full bucket, spread over the request
    window.observe(patches, probabilities, now=start + 0.1)
    assert window.held == 8  # 0.8 of a patch earned: none kept
    window.observe(patches, probabilities, now=start + 0.5)
    assert window.held == 12  # 4 patches earned in 0.5 s
    window.observe(patches, probabilities, now=start + 100)
    assert window.held == 20  # never more than one second's worth at once
