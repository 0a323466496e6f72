"""`pcam serve` as a real process on loopback: the Open Inference Protocol against an independent
client (tritonclient), the upload route, batching, metrics, limits, the token, every bad input
answered with a 4xx naming the field while good requests flow, and a clean stop on SIGTERM."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.serving import (
    TOKEN,
    bad_cases,
    encode,
    infer_binary,
    multipart,
    probabilities,
    request,
    running_server,
)

LIMITS = {"max_patches": 64, "max_body_mb": 8}


@pytest.fixture(scope="module")
def server(served: Path):
    with running_server(served, **LIMITS) as (url, _):
        yield url


@pytest.fixture(scope="module")
def test_patches(tiny_data: Path) -> np.ndarray:
    with h5py.File(tiny_data / "test.h5") as handle:
        return handle["x"][:]


@pytest.fixture(scope="module")
def predicted(
    exported_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    """What `pcam predict` gives the test split with the checkpoint the export came from."""
    from pcam_pipeline import predict

    out = tmp_path_factory.mktemp("predict") / "scores.csv"
    predict.main(exported_run / "models" / "best.pt", [tiny_data / "test.h5"], out, None, "cpu")
    with open(out) as handle:
        return np.asarray([float(row["probability"]) for row in csv.DictReader(handle)])


def test_tritonclient_gets_the_probabilities_pcam_predict_gives(server, test_patches, predicted):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("pcam")
    metadata = client.get_model_metadata("pcam")
    assert metadata["inputs"] == [
        {"name": "patches", "datatype": "UINT8", "shape": [-1, 96, 96, 3]}
    ]
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for binary in (True, False):  # the binary tensor extension (tritonclient's default) and JSON
        tensor = triton.InferInput("patches", list(test_patches.shape), "UINT8")
        tensor.set_data_from_numpy(test_patches, binary_data=binary)
        wanted = triton.InferRequestedOutput("probability", binary_data=binary)
        result = client.infer("pcam", [tensor], outputs=[wanted], request_id="r1")
        got = result.as_numpy("probability")
        assert got.shape == (len(test_patches),)
        np.testing.assert_allclose(got, predicted, atol=1e-5, rtol=0)
        assert result.get_response()["id"] == "r1"


def test_the_model_metadata_carries_the_model_cards_identity(server, served):
    card = json.loads((served / "models" / "export" / "model_card.json").read_text())
    status, _, body = request(f"{server}/v2/models/pcam")
    identity = json.loads(body)["parameters"]
    assert status == 200
    assert identity["md5"] == card["files"]["model.onnx"]["md5"]
    assert identity["test_auroc"] == card["metrics"]["test"]["auroc"]
    assert identity["threshold"] == card["metrics"]["threshold"]["value"]
    assert identity["precision"] == "fp32" and identity["name"] == card["model"]["name"]
    assert json.loads(body)["versions"] == [identity["md5"][:12]]
    status, _, _ = request(f"{server}/v2/models/pcam/versions/{identity['md5'][:12]}/ready")
    assert status == 200


def test_uploaded_patch_files_get_probability_and_decision(server, test_patches, predicted):
    files = [(f"patch-{i}.png", encode(test_patches[i])) for i in range(3)]
    files.append(("patch-3.tiff", encode(test_patches[3], "TIFF")))
    body, headers = multipart(files)
    status, _, answer = request(f"{server}/score", "POST", body, headers)
    result = json.loads(answer)
    assert status == 200, result
    assert [r["file"] for r in result["results"]] == [name for name, _ in files]
    got = np.asarray([r["probability"] for r in result["results"]])
    np.testing.assert_allclose(got, predicted[:4], atol=1e-5, rtol=0)
    threshold = result["threshold"]
    assert [r["tumour"] for r in result["results"]] == [bool(p >= threshold) for p in got]
    assert result["model"]["md5"] and result["model"]["test_auroc"] > 0


class GoodTraffic:
    """Good requests in a loop on another thread, each answer checked, while a test runs."""

    def __init__(self, server: str, patches: np.ndarray, expected: np.ndarray) -> None:
        self.server, self.patches, self.expected = server, patches, expected
        self.answered, self.wrong = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            i = index % len(self.patches)
            body, headers = infer_binary(self.patches[i : i + 2])
            status, _, answer = request(
                f"{self.server}/v2/models/pcam/infer", "POST", body, headers
            )
            if status != 200 or not np.allclose(
                probabilities(answer), self.expected[i : i + 2], atol=1e-5
            ):
                self.wrong.append((status, answer[:200]))
            self.answered += 1
            index += 1

    def __enter__(self) -> GoodTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_every_bad_input_gets_a_4xx_naming_the_field_while_good_requests_flow(
    server, test_patches, predicted
):
    with GoodTraffic(server, test_patches[:-1], predicted[:-1]) as good:
        for name, (method, route, body, headers, status, says) in bad_cases(
            test_patches[0]
        ).items():
            got, got_headers, answer = request(f"{server}{route}", method, body, headers)
            assert got == status, (name, got, answer[:300])
            assert got_headers["content-type"] == "application/json", name
            message = json.loads(answer)["error"]
            assert says in message, (name, message)
            assert "Traceback" not in message
    assert good.answered > 0 and good.wrong == []


def test_200_requests_from_16_threads_a_fifth_malformed(server, test_patches, predicted):
    bad = list(bad_cases(test_patches[0]).values())

    def send(i: int) -> tuple[bool, int, bytes]:
        if i % 5 == 0:
            method, route, body, headers, _, _ = bad[(i // 5) % len(bad)]
            got, _, answer = request(f"{server}{route}", method, body, headers)
            return False, got, answer
        body, headers = infer_binary(test_patches[i % 60 : i % 60 + 4])
        got, _, answer = request(f"{server}/v2/models/pcam/infer", "POST", body, headers)
        ok = got == 200 and np.allclose(
            probabilities(answer), predicted[i % 60 : i % 60 + 4], atol=1e-5
        )
        return True, got if ok else -got, answer

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(200)))
    good = [status for is_good, status, _ in answers if is_good]
    malformed = [status for is_good, status, _ in answers if not is_good]
    assert len(good) == 160 and all(status == 200 for status in good)
    assert len(malformed) == 40 and all(400 <= status < 500 for status in malformed)
    assert request(f"{server}/v2/health/live")[0] == 200


def test_concurrent_requests_are_batched_and_metrics_say_so(server, test_patches):
    def send(i: int) -> int:
        body, headers = infer_binary(test_patches[i % 64 : i % 64 + 1])
        return request(f"{server}/v2/models/pcam/infer", "POST", body, headers)[0]

    before = _metrics(server)
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(send, range(160))) == {200}
    after = _metrics(server)
    batches = after["pcam_batch_patches_count"] - before.get("pcam_batch_patches_count", 0)
    patches = after["pcam_batch_patches_sum"] - before.get("pcam_batch_patches_sum", 0)
    assert patches >= 160 and batches < 160  # some batches held more than one request
    route = '{route="/v2/models/{model_name}/infer",status="200"}'
    assert after[f"pcam_requests_total{route}"] >= 160
    assert after['pcam_request_seconds_count{route="/v2/models/{model_name}/infer"}'] >= 160
    assert "pcam_queue_patches" in after and after["process_resident_memory_bytes"] > 0
    for channel in "rgb":
        assert after[f'pcam_input_channel_mean_count{{channel="{channel}"}}'] >= 160
    assert after["pcam_input_blank_fraction_count"] >= 160
    info = [key for key in after if key.startswith("pcam_model_info{")]
    assert len(info) == 1 and 'precision="fp32"' in info[0]


def _metrics(server: str) -> dict[str, float]:
    status, headers, body = request(f"{server}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    found = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_a_token_guards_everything_but_the_probes_and_the_page(served, test_patches):
    with running_server(served, env={"PCAM_SERVE_TOKEN": TOKEN}) as (url, _):
        # 64 patches: a refused body is read before the 401 goes out, not left to reset the
        # connection (which a container's port forwarding turns it into)
        body, headers = infer_binary(test_patches[:64])
        infer = f"{url}/v2/models/pcam/infer"
        status, got_headers, answer = request(infer, "POST", body, headers)
        assert status == 401 and "Authorization: missing" in json.loads(answer)["error"]
        assert got_headers["www-authenticate"] == "Bearer"
        wrong = {**headers, "Authorization": "Bearer not-the-token-at-all"}
        status, _, answer = request(infer, "POST", body, wrong)
        assert status == 403 and "wrong token" in json.loads(answer)["error"]
        assert (
            request(infer, "POST", body, {**headers, "Authorization": f"Bearer {TOKEN}"})[0] == 200
        )
        assert request(f"{url}/metrics")[0] == 401
        assert request(f"{url}/v2/health/ready")[0] == 200 and request(f"{url}/")[0] == 200


def test_sigterm_answers_the_request_in_flight_then_exits_0(served, test_patches):
    with running_server(served) as (url, process):
        body, headers = infer_binary(test_patches[:8])
        port = int(url.rsplit(":", 1)[1])
        head = (
            "POST /v2/models/pcam/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(head + body[:1000])  # the request is in flight: half its body sent
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with pytest.raises(OSError):  # no new connections once it is stopping
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            client.sendall(body[1000:])
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 100:
                chunk = client.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("host", "env", "says"),
    [
        (
            "0.0.0.0",
            {},
            "serve.host '0.0.0.0' is reachable beyond this machine: set a bearer token",
        ),
        ("127.0.0.1", {"PCAM_SERVE_TOKEN": "short"}, "the bearer token has 5 characters"),
    ],
)
def test_unsafe_settings_are_refused_before_listening(served, host, env, says):
    import os
    import subprocess
    import sys

    from tests.tiny_pipeline import write_params_file

    params = write_params_file(served, serve={"host": host, "port": 1})
    done = subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.cli", "--params", str(params), "serve"],
        cwd=served, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and says in done.stderr


def test_an_edited_onnx_file_is_never_served(served, tmp_path):
    from pcam_pipeline.errors import PipelineError
    from pcam_pipeline.serve.model import load_model

    export = shutil.copytree(served / "models" / "export", tmp_path / "export")
    with open(export / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PipelineError, match=r"model.onnx: md5 \w+ is not the \w+ its model card"):
        load_model(export, "fp32", "cpu", 1)
    with pytest.raises(PipelineError, match=r"model_card.json: not found; run `dvc repro export`"):
        load_model(tmp_path / "nowhere", "int8", "cpu", 1)
    assert (
        load_model(served / "models" / "export", "int8", "cpu", 1).identity["file"]
        == "model.int8.onnx"
    )
