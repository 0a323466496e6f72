"""A real HTTP server on loopback serving files the tests make, with Range and planted faults."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Behaviour:
    files: dict[str, bytes] = field(default_factory=dict)
    # name -> number of bytes after which the first response for that name is cut off
    cut_after: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(behaviour: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1].split("?")[0]
            header = self.headers.get("Range")
            behaviour.requests.append((name, header))
            body = behaviour.files.get(name)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if header and not behaviour.ignore_range:
                start = int(header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            cut = behaviour.cut_after.pop(name, None)
            if cut is not None:
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@contextmanager
def serve(behaviour: Behaviour) -> Iterator[str]:
    """Serve `behaviour.files` on 127.0.0.1 (a free port); yield the base URL; stop afterwards."""
    with _running(ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour))) as base:
        yield f"{base}/records/files"


@contextmanager
def _running(server: ThreadingHTTPServer) -> Iterator[str]:
    """Run `server` in a thread; yield its base URL; stop and close it afterwards."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def gzip_files(directory: Path) -> dict[str, bytes]:
    import gzip

    return {f"{p.name}.gz": gzip.compress(p.read_bytes(), mtime=0) for p in directory.iterdir()}


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve DIRECTORY's files as they are (index.html for a folder, with its Content-Type, as a
    PEP 503 simple index needs) on 127.0.0.1; yield the base URL; stop afterwards."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    with _running(
        ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    ) as base:
        yield base
