"""`pcam serve`: load the exported model, refuse unsafe settings, and run the app under uvicorn
until SIGTERM or SIGINT; then it stops taking connections, answers the requests in flight and
exits 0."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import ServeParams

if TYPE_CHECKING:
    from pcam_pipeline.drift.window import DriftWindow

TOKEN_ENV = "PCAM_SERVE_TOKEN"
GRACE_SECONDS = 30  # the longest a request in flight is waited for after SIGTERM


@dataclass(frozen=True)
class ServeOptions:
    export_dir: Path
    device: str  # auto | cpu | cuda (ONNX Runtime's CUDA provider)
    threads: int  # ONNX Runtime's threads; 0: one per core
    token_file: Path | None
    drift_reference: Path | None = None  # a directory; else the export's drift/ or its sibling


def reference_dir(options: ServeOptions) -> Path | None:
    """Where the drift reference is: the option, else `drift/` in the export directory (a
    bundle) or beside it (models/drift beside models/export); None where there is none."""
    if options.drift_reference is not None:
        return options.drift_reference
    for candidate in (options.export_dir / "drift", options.export_dir.parent / "drift"):
        if (candidate / "reference.json").is_file():
            return candidate
    return None


def drift_window(
    params: ServeParams, options: ServeOptions, identity: dict[str, Any]
) -> DriftWindow | None:
    """The rolling drift window over the served model's reference, or None (no reference, or
    serve.drift_window 0). A reference written with another checkpoint is refused."""
    where = reference_dir(options)
    if where is None or params.drift_window == 0:
        return None
    from pcam_pipeline.drift.profile import load_reference
    from pcam_pipeline.drift.window import DriftWindow

    reference = load_reference(where)
    served, recorded = identity.get("checkpoint_md5"), reference.meta.get("model_md5")
    if served is not None and recorded is not None and served != recorded:
        raise PipelineError(
            f"{where}/reference.json: written with checkpoint md5 {recorded}, but the served model "
            f"comes from {served}. Fix: give the reference of this model (--drift-reference) or "
            "write it with this model (`dvc repro drift_reference`)"
        )
    return DriftWindow(
        reference,
        params.drift_window,
        params.drift_patches_per_s,
        params.drift_min_patches,
        reference.alpha,
        reference.correction,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def read_token(environ: dict[str, str], token_file: Path | None) -> str | None:
    """The bearer token from $PCAM_SERVE_TOKEN or a file (never argv: `ps` shows argv)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise PipelineError(
                f"--token-file {token_file}: cannot be read ({exc.strerror})"
            ) from None
        if not token:
            raise PipelineError(f"--token-file {token_file}: empty; write the token into it")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def checked_token(host: str, token: str | None) -> str | None:
    if token is not None and len(token) < 16:
        raise PipelineError(
            f"the bearer token has {len(token)} characters; use at least 16 "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if token is None and not is_loopback(host):
        raise PipelineError(
            f"serve.host {host!r} is reachable beyond this machine: set a bearer token in "
            f"${TOKEN_ENV} or give --token-file FILE, or bind 127.0.0.1"
        )
    return token


def draining_server(config: object) -> object:
    """uvicorn's server, except that SIGTERM (and SIGINT) only start its graceful stop: uvicorn
    raises the signal again once it has drained, so the process would die by it and a service
    manager or Slurm would read a clean stop as a failure. A second SIGINT forces the exit."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, frame: object) -> None:
                if self.should_exit and signum == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return DrainingServer(config)


def main(params: ServeParams, options: ServeOptions) -> None:
    import uvicorn

    from pcam_pipeline.serve.app import Limits, create_app
    from pcam_pipeline.serve.batching import Batcher
    from pcam_pipeline.serve.metrics import ServeMetrics
    from pcam_pipeline.serve.model import load_model

    token = checked_token(params.host, read_token(dict(os.environ), options.token_file))
    # ONNX Runtime 1.32 keeps a usage-telemetry database under ~/.cache on Linux unless told not
    # to: a server has no business writing there.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    model = load_model(options.export_dir, params.precision, options.device, options.threads)
    metrics = ServeMetrics(model.identity, drift_window(params, options, model.identity))
    batcher = Batcher(
        model.probabilities,
        max_batch=params.max_batch_size,
        max_delay=params.max_queue_delay_us / 1e6,
        on_queue=metrics.queue.set,
        on_batch=metrics.batch.observe,
    )
    limits = Limits(max_body_bytes=int(params.max_body_mb * 2**20), max_patches=params.max_patches)
    app = create_app(model, metrics, batcher, limits, token)
    where = f"http://{params.host}:{params.port}"
    print(
        f"pcam serve: {model.identity['file']} (md5 {model.identity['md5']}, "
        f"{', '.join(model.identity['providers'])}) on {where}/ ; "
        f"{'bearer token required' if token else 'no token (loopback only)'}",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=params.host,
        port=params.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
        server_header=False,
    )
    server = draining_server(config)
    server.run()  # type: ignore[attr-defined]
    if not server.started:  # type: ignore[attr-defined]
        raise PipelineError(f"{where}: could not listen there (the log above says why)")
