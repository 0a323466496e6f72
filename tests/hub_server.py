"""A real HTTP server on loopback answering the Hugging Face hub's file endpoints, as
`huggingface_hub.hf_hub_download` calls them through $HF_ENDPOINT: HEAD (the file's commit,
etag and size) and GET of `/<repo>/resolve/<revision>/<file>`, for files the tests make."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _handler(files: dict[str, bytes], requests: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, with_body: bool) -> None:
            path = self.path.split("?")[0]
            requests.append(f"{self.command} {path}")
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, name = rest.partition("/")
            body = files.get(f"{repo}/{name}")
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_GET(self) -> None:
            self._answer(with_body=True)

    return Handler


@contextmanager
def hub_server(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """Serve `files` ('<org>/<repo>/<file>' -> bytes) on loopback: (its URL, the requests)."""
    requests: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files, requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
