"""The serving app in-process (no socket, no subprocess): the same requests as
tests/serve/test_server.py's real server gets, sent straight to the ASGI app, so the protocol, the
limits, the token and the metrics are also measured by `make coverage`; and the safety checks
`pcam serve` runs before it listens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.serve.app import Limits, create_app
from pcam_pipeline.serve.batching import Batcher
from pcam_pipeline.serve.metrics import ServeMetrics
from pcam_pipeline.serve.model import ServedModel, load_model
from pcam_pipeline.serve.server import checked_token, is_loopback, read_token
from tests.serving import TOKEN, bad_cases, call, encode, infer_binary, infer_json, multipart

LIMITS = Limits(max_body_bytes=8 << 20, max_patches=64)


@pytest.fixture(scope="module")
def model(served: Path) -> ServedModel:
    return load_model(served / "models" / "export", "fp32", "cpu", 1)


@pytest.fixture(scope="module")
def patches(tiny_data: Path) -> np.ndarray:
    with h5py.File(tiny_data / "test.h5") as handle:
        return handle["x"][:8]


def serving(
    model: ServedModel, token: str | None, requests: list[tuple]
) -> tuple[list, ServeMetrics]:
    """Start the batcher, send `requests` (method, path, body, headers) concurrently, stop."""
    metrics = ServeMetrics(model.identity)
    batcher = Batcher(model.probabilities, 16, 0.002, metrics.queue.set, metrics.batch.observe)
    app = create_app(model, metrics, batcher, LIMITS, token)

    async def scenario() -> list:
        batcher.start()
        try:
            return await asyncio.gather(*(call(app, *r) for r in requests))
        finally:
            await batcher.stop()

    return asyncio.run(scenario()), metrics


def test_infer_json_and_binary_give_the_models_probabilities(model, patches):
    expected = model.probabilities(patches)
    body, headers = infer_binary(patches)
    answers, metrics = serving(
        model,
        None,
        [
            ("POST", "/v2/models/pcam/infer", infer_json(patches), {}),
            ("POST", "/v2/models/pcam/infer", body, headers),
            (
                "POST",
                f"/v2/models/pcam/versions/{model.version}/infer",
                infer_json(patches[:1]),
                {},
            ),
        ],
    )
    for status, _, answer in answers:
        assert status == 200
        output = json.loads(answer)["outputs"][0]
        assert output["name"] == "probability" and output["datatype"] == "FP32"
        np.testing.assert_allclose(output["data"], expected[: output["shape"][0]], atol=1e-6)
    assert metrics.patches._value.get() == 17


def test_binary_output_is_the_float32_bytes_after_the_header(model, patches):
    header = {
        "inputs": [{"name": "patches", "shape": [2, 96, 96, 3], "datatype": "UINT8",
                    "parameters": {"binary_data_size": 2 * 27648}}],
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}],
        "id": "abc",
    }  # fmt: skip
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))}
    [(status, got, answer)], _ = serving(
        model, None, [("POST", "/v2/models/pcam/infer", head + patches[:2].tobytes(), headers)]
    )
    assert status == 200 and got["content-type"] == "application/octet-stream"
    length = int(got["inference-header-content-length"])
    meta = json.loads(answer[:length])
    assert meta["id"] == "abc" and meta["outputs"][0]["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(
        np.frombuffer(answer[length:], "<f4"), model.probabilities(patches[:2])
    )


def test_every_bad_input_gets_its_4xx_in_process(model, patches):
    cases = bad_cases(patches[0])
    requests = [
        (m, route, body or b"", headers) for m, route, body, headers, _, _ in cases.values()
    ]
    answers, metrics = serving(model, None, requests)
    for (name, (*_, status, says)), (got, _, answer) in zip(cases.items(), answers, strict=True):
        assert got == status, (name, answer[:300])
        assert says in json.loads(answer)["error"], name
    counted = metrics.registry.get_sample_value(
        "pcam_requests_total", {"route": "/v2/models/{model_name}/infer", "status": "400"}
    )
    infer_400 = [c for c in cases.values() if c[1] == "/v2/models/pcam/infer" and c[4] == 400]
    assert counted == len(infer_400)


def test_upload_page_card_metadata_and_metrics(model, patches):
    files = [("a.png", encode(patches[0])), ("<b>b</b>.tif", encode(patches[1], "TIFF"))]
    body, headers = multipart(files)
    answers, _ = serving(
        model,
        None,
        [
            ("POST", "/score", body, headers),
            ("GET", "/", b"", {}),
            ("GET", "/card", b"", {}),
            ("GET", "/v2", b"", {}),
            ("GET", "/v2/models/pcam", b"", {}),
            ("GET", "/v2/models/pcam/ready", b"", {}),
            ("GET", "/v2/health/live", b"", {}),
            ("GET", "/metrics", b"", {}),
        ],
    )
    assert all(status == 200 for status, _, _ in answers)
    scored = json.loads(answers[0][2])
    assert [r["file"] for r in scored["results"]] == ["a.png", "<b>b</b>.tif"]
    np.testing.assert_allclose(
        [r["probability"] for r in scored["results"]], model.probabilities(patches[:2]), atol=1e-6
    )
    assert b"<title>PCAM classifier</title>" in answers[1][2]
    assert json.loads(answers[2][2])["card"]["intended_use"]
    assert json.loads(answers[3][2])["extensions"] == ["binary_tensor_data"]
    assert json.loads(answers[4][2])["parameters"]["md5"] == model.identity["md5"]
    assert b"pcam_batch_patches_count" in answers[7][2]


def test_the_token_guards_the_api_not_the_probes(model, patches):
    body, headers = infer_binary(patches[:2])
    infer = "/v2/models/pcam/infer"
    answers, _ = serving(
        model,
        TOKEN,
        [
            ("POST", infer, body, headers),
            ("POST", infer, body, {**headers, "Authorization": "Bearer wrong-token-0123456789"}),
            ("POST", infer, body, {**headers, "Authorization": f"Bearer {TOKEN}"}),
            ("GET", "/v2/health/ready", b"", {}),
            ("GET", "/metrics", b"", {}),
        ],
    )
    assert [status for status, _, _ in answers] == [401, 403, 200, 200, 401]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("10.1.2.3", False), ("node123.cluster", False)],
)  # fmt: skip
def test_loopback_is_told_apart(host, loopback):
    assert is_loopback(host) is loopback


def test_a_token_comes_from_the_environment_or_a_file_never_too_short(tmp_path):
    assert read_token({"PCAM_SERVE_TOKEN": f" {TOKEN}\n"}, None) == TOKEN
    assert read_token({}, None) is None
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert read_token({"PCAM_SERVE_TOKEN": "other"}, file) == TOKEN  # the file wins
    file.write_text("")
    with pytest.raises(PipelineError, match="empty; write the token into it"):
        read_token({}, file)
    with pytest.raises(PipelineError, match="cannot be read"):
        read_token({}, tmp_path / "missing")
    with pytest.raises(PipelineError, match="reachable beyond this machine"):
        checked_token("0.0.0.0", None)
    with pytest.raises(PipelineError, match="has 5 characters; use at least 16"):
        checked_token("127.0.0.1", "short")
    assert checked_token("0.0.0.0", TOKEN) == TOKEN and checked_token("127.0.0.1", None) is None
