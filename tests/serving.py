"""`pcam serve` as its users start it (a real process on loopback), requests as its clients send
them, the bad inputs every server must refuse, and one request straight through the ASGI app
(`call`). Imported by the tests in tests/serve/ and the serving integration tests."""

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


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: refused before a pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 << 20))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def bad_cases(patch: np.ndarray) -> dict[str, tuple[str, str, bytes, dict, int, str]]:
    """name -> (method, route, body, headers, status, what the error must say)."""
    good_png = encode(patch)
    one = patch[None]

    def upload(name: str, data: bytes) -> tuple[bytes, dict]:
        return multipart([(name, data)])

    infer = "/v2/models/pcam/infer"
    binary_body, binary_headers = infer_binary(one)
    nan_request = infer_json(one).replace(
        b"[" + str(int(patch.reshape(-1)[0])).encode() + b",", b"[NaN,", 1
    )
    cases = {
        "not an image": (
            "POST",
            "/score",
            *upload("notes.png", b"hello, not a picture"),
            400,
            "notes.png: not a readable image",
        ),
        "truncated png": (
            "POST",
            "/score",
            *upload("cut.png", good_png[: len(good_png) // 2]),
            400,
            "cut.png: not a readable image",
        ),
        "wrong size": (
            "POST",
            "/score",
            *upload("small.png", encode(patch[:32, :32])),
            400,
            "small.png: 32x32 pixels, expected 96x96",
        ),
        "channel count": (
            "POST",
            "/score",
            *upload("grey.png", encode(patch[..., 0])),
            400,
            "grey.png: mode L, expected an 8-bit RGB(A) patch",
        ),
        "bit depth": (
            "POST",
            "/score",
            *upload("deep.png", sixteen_bit_png()),
            400,
            "deep.png: mode 16-bit RGB",
        ),
        "decompression bomb": (
            "POST",
            "/score",
            *upload("bomb.png", bomb_png(30000, 30000)),
            400,
            "bomb.png:",
        ),
        "no files": ("POST", "/score", *multipart([]), 400, "files: none in the form"),
        "not multipart": (
            "POST",
            "/score",
            good_png,
            {"Content-Type": "image/png"},
            400,
            "header Content-Type",
        ),
        "tensor shape": (
            "POST",
            infer,
            infer_json(patch[None, :48]),
            {},
            400,
            "inputs[0].shape: [1, 48, 96, 3] is not [N, 96, 96, 3]",
        ),
        "datatype": (
            "POST",
            infer,
            infer_json(one, datatype="FP32"),
            {},
            400,
            "inputs[0].datatype: 'FP32'",
        ),
        "element count": (
            "POST",
            infer,
            infer_json(one, shape=[2, 96, 96, 3]),
            {},
            400,
            "inputs[0].data: 27648 values for shape of 55296",
        ),
        "binary size": ("POST", infer, binary_body[:-5], binary_headers, 400, "binary_data_size"),
        "nan": ("POST", infer, nan_request, {}, 400, "inputs[0].data[0]: NaN"),
        "out of range": (
            "POST",
            infer,
            infer_json(one.astype(np.int32) + 300, datatype="UINT8"),
            {},
            400,
            "is not a UINT8 pixel value",
        ),
        "input name": (
            "POST",
            infer,
            infer_json(one, name="x"),
            {},
            400,
            "inputs[0].name: 'x'; this model's input is 'patches'",
        ),
        "empty body": ("POST", infer, b"", {}, 400, "body: empty"),
        "not json": ("POST", infer, b"{not json", {}, 400, "body: not JSON"),
        "too many patches": (
            "POST",
            infer,
            *infer_binary(np.repeat(one, 65, axis=0)),
            413,
            "65 patches; send 1 to 64",
        ),
        "oversized body": ("POST", infer, b"0" * (9 << 20), {}, 413, "over this server's limit"),
        "unknown model": (
            "POST",
            "/v2/models/resnet/infer",
            infer_json(one),
            {},
            404,
            "model 'resnet': not served here",
        ),
        "unknown version": (
            "GET",
            "/v2/models/pcam/versions/9/ready",
            None,
            {},
            404,
            "model version '9'",
        ),
        "unknown route": ("GET", "/v2/nothing", None, {}, 404, "/v2/nothing: no such route"),
        "wrong method": (
            "GET",
            infer,
            None,
            {},
            405,
            "GET /v2/models/pcam/infer: method not allowed",
        ),
    }
    return cases


def sixteen_bit_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 96, 96, 16, 2, 0, 0, 0)
    rows = b"".join(b"\0" + bytes(96 * 6) for _ in range(96))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def call(app, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request through the ASGI app: (status, headers, body)."""
    fields = {**(headers or {}), "content-length": str(len(body))}
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
        "headers": [(k.lower().encode(), str(v).encode()) for k, v in fields.items()],
    }  # fmt: skip
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    got = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], got, b"".join(m.get("body", b"") for m in sent[1:])
