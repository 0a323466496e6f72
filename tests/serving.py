"""`pcam serve` as its users start it (a real process on loopback), and requests as its clients
send them. Imported by tests/test_serve.py and the serving integration tests."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.serve.protocol import binary_request
from tests.tiny_pipeline import write_params_file

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(
    run: Path, env: dict[str, str] | None = None, **serve: Any
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pcam serve` on a free loopback port in `run` (which holds models/export/ and gets a
    params.yaml whose serve section `serve` updates): (its URL, the process). Stopped with
    SIGTERM afterwards; its output is in the error if it fails to start."""
    import os

    port = free_port()
    params = write_params_file(run, serve={"port": port, **serve})
    process = subprocess.Popen(
        [sys.executable, "-m", "pcam_pipeline.cli", "--params", str(params), "serve"],
        cwd=run,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"pcam serve exited {process.returncode}:\n{process.stdout.read()}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"pcam serve not ready after {timeout} s:\n{process.stdout.read()}")


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; a 4xx/5xx is returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def infer_json(patches: np.ndarray, datatype: str = "UINT8", **tensor: Any) -> bytes:
    """A JSON infer request (no binary extension) for uint8 (N,96,96,3) patches."""
    spec = {
        "name": "patches",
        "shape": list(patches.shape),
        "datatype": datatype,
        "data": patches.reshape(-1).tolist(),
        **tensor,
    }
    return json.dumps({"inputs": [spec]}).encode()


def infer_binary(patches: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor-data infer request (what tritonclient sends by default), JSON answer."""
    return binary_request(patches, binary_output=False)


def probabilities(body: bytes) -> np.ndarray:
    return np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body holding `files` (name, bytes), as a browser sends it."""
    boundary = "pcam-test-boundary-7f3a"
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
