"""The HTTP side of `pcam serve`: an ASGI app (Starlette, run by uvicorn) with the Open Inference
Protocol's routes, an upload route for patch images, the web page and /metrics. Whatever a
client sends wrong is answered with a 4xx JSON `{"error": ...}` that names the field and the fix."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcam_pipeline.export.runner import BadInput, decode_patch
from pcam_pipeline.serve.batching import Batcher
from pcam_pipeline.serve.metrics import ServeMetrics
from pcam_pipeline.serve.model import MODEL_NAME, ServedModel
from pcam_pipeline.serve.protocol import (
    HEADER_LENGTH,
    BadRequest,
    infer_response,
    parse_infer,
    split_body,
)

log = logging.getLogger(__name__)
PUBLIC = frozenset({"/", "/v2/health/live", "/v2/health/ready"})  # probes and the page's shell
DESCRIBED = {404: "no such route here", 405: "method not allowed on this route"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_patches: int


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    response = error(status, message, headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def drain(receive: Receive, length: bytes | None, limit: int) -> None:
    """Read and drop a request's body (up to `limit` bytes) before refusing it: a client that
    sends its whole body before reading the answer then gets the refusal, not a reset
    connection (through a container's port forwarding, an unread body turns into one)."""
    if length is None or not length.isdigit() or int(length) > limit:
        return
    more = True
    while more:
        message = await receive()
        more = message["type"] == "http.request" and message.get("more_body", False)


class BearerToken:
    """Every route but the probes and the page needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str | None, drain_limit: int) -> None:
        self.app, self.token, self.drain_limit = app, token, drain_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in PUBLIC:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if not (given.startswith("Bearer ") and self.matches(given.removeprefix("Bearer "))):
            await drain(receive, headers.get(b"content-length"), self.drain_limit)
        if not given.startswith("Bearer "):
            return await send_error(
                send, 401, "header Authorization: missing; send 'Authorization: Bearer <token>' "
                "(the token the server was started with)", {"www-authenticate": "Bearer"},
            )  # fmt: skip
        if not self.matches(given.removeprefix("Bearer ")):
            return await send_error(
                send, 403, "header Authorization: wrong token; use the token the server was "
                "started with (PCAM_SERVE_TOKEN or --token-file)",
            )  # fmt: skip
        await self.app(scope, receive, send)

    def matches(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())


class BodyLimit:
    """A body over the limit is refused: by its Content-Length before it is kept, or once the
    bytes read pass the limit (a body sent without a length). A refused body announced by its
    length is read and dropped (up to DRAIN_FACTOR times the limit) before the 413 goes out, so
    a client that sends the whole body before reading the answer gets the 413, not a reset."""

    DRAIN_FACTOR = 8

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def refusal(self, size: str) -> str:
        return (
            f"body: {size} bytes, over this server's limit of {self.limit}; send fewer patches "
            "per request (binary tensor data is 27,648 bytes a patch, JSON about 4 times more)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await drain(receive, length, self.DRAIN_FACTOR * self.limit)
            return await send_error(send, 413, self.refusal(length.decode("latin-1")))
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.refusal(f"over {received}"))
            return message

        await self.app(scope, limited, send)


class Measured:
    """Counts and times every request by its route's template (a bounded set of labels)."""

    def __init__(self, inner: ASGIApp, routes: list[Route], metrics: ServeMetrics) -> None:
        self.inner, self.routes, self.metrics = inner, routes, metrics

    def route_of(self, scope: Scope) -> str:
        matches = [(route.matches(scope)[0], route.path) for route in self.routes]
        for wanted in (Match.FULL, Match.PARTIAL):  # PARTIAL: the path, with another method
            found = next((path for match, path in matches if match == wanted), None)
            if found is not None:
                return found
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, send_status)
        finally:
            # The router leaves the route it chose in the scope; a request refused before
            # routing (token, body size) is matched here.
            chosen = scope.get("route")
            route = chosen.path if chosen is not None else self.route_of(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class Handlers:
    """The routes' bodies, over one model and its batcher."""

    def __init__(
        self, model: ServedModel, batcher: Batcher, metrics: ServeMetrics, limits: Limits
    ) -> None:
        self.model, self.batcher, self.metrics, self.limits = model, batcher, metrics, limits

    def check_name(self, request: Request) -> None:
        name = request.path_params["model_name"]
        if name != MODEL_NAME:
            raise BadRequest(
                f"model {name!r}: not served here; this server serves {MODEL_NAME!r} "
                f"(GET /v2/models/{MODEL_NAME})",
                status=404,
            )
        version = request.path_params.get("model_version")
        if version not in (None, self.model.version):
            raise BadRequest(
                f"model version {version!r}: not served here; the version served is "
                f"{self.model.version!r} (or leave the version out)",
                status=404,
            )

    async def score(self, patches: np.ndarray) -> np.ndarray:
        self.metrics.observe_inputs(patches)
        probabilities = await self.batcher.infer(patches)
        self.metrics.observe_scored(patches, probabilities)
        return probabilities

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        from pcam_pipeline import __version__

        return JSONResponse(
            {"name": "pcam-serve", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(self, request: Request) -> Response:
        self.check_name(request)
        return JSONResponse(
            {
                "name": MODEL_NAME,
                "versions": [self.model.version],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": self.model.input_name, "datatype": "UINT8", "shape": [-1, 96, 96, 3]}
                ],
                "outputs": [{"name": self.model.output_name, "datatype": "FP32", "shape": [-1]}],
                "parameters": self.model.identity,
            }
        )

    async def model_ready(self, request: Request) -> Response:
        self.check_name(request)
        return JSONResponse({"name": MODEL_NAME, "ready": True})

    async def card(self, request: Request) -> Response:
        return JSONResponse({"identity": self.model.identity, "card": self.model.card})

    async def infer(self, request: Request) -> Response:
        self.check_name(request)
        header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        parsed = parse_infer(header, binary, self.model.input_name, self.limits.max_patches)
        probabilities = await self.score(parsed.patches)
        body, headers = infer_response(
            parsed, probabilities, self.model.version, self.model.output_name
        )
        return Response(body, headers=headers)

    async def upload(self, request: Request) -> Response:
        """POST multipart/form-data, one or more patch images (PNG or TIFF) in any field."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest(
                "header Content-Type: not multipart/form-data; upload the patch images as form "
                "files (curl -F files=@patch.png ...)"
            )
        limit = self.limits.max_patches
        try:
            form = await request.form(max_files=limit, max_fields=limit)
        except HTTPException as exc:
            if exc.status_code == 413:
                raise
            raise BadRequest(f"body: {exc.detail}; send at most {limit} patch files") from None
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise BadRequest(
                "files: none in the form; attach 96x96 PNG or TIFF patches (-F files=@a.png)"
            )
        names, patches = [], []
        for upload in uploads:
            name = upload.filename or "(unnamed file)"
            try:
                patches.append(decode_patch(await upload.read(), name))
            except BadInput as exc:
                raise BadRequest(f"files: {exc}") from None
            names.append(name)
        probabilities = await self.score(np.stack(patches))
        threshold = self.model.threshold
        return JSONResponse(
            {
                "model": self.model.identity,
                "threshold": threshold,
                "results": [
                    {"file": name, "probability": float(p), "tumour": bool(p >= threshold)}
                    for name, p in zip(names, probabilities, strict=True)
                ],
            }
        )

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    async def metrics_text(self, request: Request) -> Response:
        self.metrics.refresh_drift()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    model: ServedModel, metrics: ServeMetrics, batcher: Batcher, limits: Limits, token: str | None
) -> ASGIApp:
    h = Handlers(model, batcher, metrics, limits)
    model_paths = ["/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"]
    routes = [
        Route("/", h.page),
        Route("/v2", h.server_metadata),
        Route("/v2/health/live", h.live),
        Route("/v2/health/ready", h.ready),
        *[Route(path, h.model_metadata) for path in model_paths],
        *[Route(f"{path}/ready", h.model_ready) for path in model_paths],
        *[Route(f"{path}/infer", h.infer, methods=["POST"]) for path in model_paths],
        Route("/score", h.upload, methods=["POST"]),
        Route("/card", h.card),
        Route("/metrics", h.metrics_text),
    ]

    async def bad_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return error(exc.status, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail if exc.detail not in (None, "") else DESCRIBED.get(exc.status_code, "")
        if exc.status_code == 404:
            message = (
                f"{request.url.path}: no such route; see GET /v2 and GET /v2/models/{MODEL_NAME}"
            )
        elif exc.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed here"
        return error(exc.status_code, str(message), exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = Starlette(
        routes=routes,
        exception_handlers={
            BadRequest: bad_request,
            HTTPException: http_error,
            Exception: unexpected,
        },
        lifespan=lifespan,
    )
    guarded = BearerToken(BodyLimit(app, limits.max_body_bytes), token, limits.max_body_bytes)
    return Measured(guarded, routes, metrics)
