#!/usr/bin/env python3
"""Local S3-compatible server (moto[server]) for trying out and testing the DVC remote.

  scripts/s3-server.py start  [--port 5555] [--host 127.0.0.1] [--bucket pcam-dvc]
                              [--require-auth | --public-read] [--state-dir DIR]
  scripts/s3-server.py stop   [--port 5555] [--state-dir DIR]
  scripts/s3-server.py status [--port 5555] [--state-dir DIR]

start: launches `python -m moto.server` on a loopback address only, waits until it answers,
       creates the bucket and prints the endpoint. The PID, the log and (with --require-auth)
       a credentials file live in the state directory (default: ${TMPDIR:-/tmp}/pcam-s3-UID-PORT).
       Without --require-auth any non-empty AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY is accepted.
       --public-read adds a bucket policy that lets anyone GET objects over plain HTTP (what a
       read-only HTTP mirror of the bucket needs); anonymous writes stay refused.
       With --require-auth the server creates an IAM user allowed s3:* on the bucket, writes its
       keys to STATE_DIR/credentials.env (mode 600, `source` it), then enforces SigV4 signatures:
       wrong keys are refused like on a real store.
stop:  stops the server by the PID in the state directory (only if that PID is a moto server).
status: exit 0 and its PID when it runs, else exit 3.

moto keeps everything in memory: a stopped server loses its buckets and objects.
It runs under $PCAM_PYTHON, else the interpreter here if it has moto[server], else the project's
.venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolenv import die, importable, use_project_python

SERVER_MODULES = ("moto.server", "boto3", "flask")
use_project_python(*SERVER_MODULES)

STARTUP_SECONDS = 60
STOP_SECONDS = 5
BOOTSTRAP_KEYS = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
USER = "pcam-dvc"
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
LOOPBACK = re.compile(r"127\..*|::1|localhost")


@dataclass(frozen=True)
class State:
    """The state directory of the server on one port: its PID, log and credentials."""

    directory: Path

    @property
    def pid_file(self) -> Path:
        return self.directory / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "server.log"

    @property
    def credentials_file(self) -> Path:
        return self.directory / "credentials.env"


def default_state_dir(port: int) -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"pcam-s3-{os.getuid()}-{port}"


def is_moto_server(pid: int) -> bool:
    """A live moto server: not gone, not a zombie (exited, not reaped yet), not a reused PID."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        # Field 3 of /proc/PID/stat is the state (after the parenthesised command name).
        status = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return b"moto.server" in cmdline and bool(status) and status[0] != "Z"


def running_pid(state: State) -> int | None:
    """The PID of the running server, or None: a PID file whose process is gone, is a zombie or
    is not a moto server (PID reused) counts as not running."""
    try:
        text = state.pid_file.read_text().strip()
    except OSError:
        return None
    pid = int(text) if text.isdigit() else None
    return pid if pid and is_moto_server(pid) else None


def write_atomically(path: Path, text: str) -> None:
    """Written under a temporary name (mode 600), then renamed: never seen half-written."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as f:
        f.write(text)
    os.replace(f.name, path)


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        return probe.connect_ex((host, port)) != 0


def endpoint_of(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def wait_until_up(endpoint: str, server: subprocess.Popen[bytes]) -> None:
    """Until the server answers; raises if its process ends or it takes too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up on {endpoint}") from None
            time.sleep(0.1)


def statement(**fields: Any) -> str:
    """A policy document of one statement."""
    return json.dumps({"Version": "2012-10-17", "Statement": [fields]})


def allow_public_read(s3: Any, bucket: str) -> None:
    """Anonymous GET of objects (what an HTTP mirror of the bucket needs); writes stay refused."""
    s3.put_bucket_policy(
        Bucket=bucket,
        Policy=statement(
            Sid="PublicRead",
            Effect="Allow",
            Principal="*",
            Action="s3:GetObject",
            Resource=f"arn:aws:s3:::{bucket}/*",
        ),
    )


def require_auth(iam: Any, endpoint: str, bucket: str, credentials_file: Path) -> None:
    """An IAM user allowed s3:* on the bucket, its keys in `credentials_file` (mode 600), then
    signatures enforced: from now on every request must be signed by a known key."""
    iam.create_user(UserName=USER)
    iam.put_user_policy(
        UserName=USER,
        PolicyName=f"{USER}-bucket",
        PolicyDocument=statement(
            Effect="Allow",
            Action="s3:*",
            Resource=[f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        ),
    )
    key = iam.create_access_key(UserName=USER)["AccessKey"]
    write_atomically(
        credentials_file,
        f"export AWS_ACCESS_KEY_ID={key['AccessKeyId']}\n"
        f"export AWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}\n",
    )
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=5).close()


def setup(
    host: str,
    port: int,
    bucket: str,
    server: subprocess.Popen[bytes],
    *,
    public_read: bool,
    auth: Path | None,
) -> None:
    """Wait for the server just started to answer, create the bucket, and the policy
    (public_read) or the IAM user whose keys go to `auth`."""
    import boto3

    endpoint = endpoint_of(host, port)
    wait_until_up(endpoint, server)
    clients = {"endpoint_url": endpoint, "region_name": "us-east-1", **BOOTSTRAP_KEYS}
    s3 = boto3.client("s3", **clients)
    s3.create_bucket(Bucket=bucket)
    if public_read:
        allow_public_read(s3, bucket)
    if auth is not None:
        require_auth(boto3.client("iam", **clients), endpoint, bucket, auth)


def start(args: argparse.Namespace, state: State) -> None:
    pid = running_pid(state)
    if pid:
        die(
            f"a server is already running (PID {pid}, state {state.directory}): "
            f"run 'scripts/s3-server.py stop --port {args.port}' first"
        )
    if not importable(*SERVER_MODULES):
        die(
            f"moto[server] is not installed for {sys.executable}: run 'make setup' "
            "(requirements.lock pins moto[server]) or set PCAM_PYTHON to an interpreter that has it"
        )
    if not port_free(args.host, args.port):
        die(f"port {args.port} on {args.host} is already in use: pick another --port")
    state.directory.mkdir(parents=True, exist_ok=True)
    state.directory.chmod(0o700)
    state.credentials_file.unlink(missing_ok=True)
    # Its own session, stdin/stdout/stderr detached: the server outlives this command and its
    # caller's pipes.
    with state.log_file.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", args.host, "-p", str(args.port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    write_atomically(state.pid_file, f"{server.pid}\n")
    auth = state.credentials_file if args.require_auth else None
    try:
        setup(args.host, args.port, args.bucket, server, public_read=args.public_read, auth=auth)
    except Exception as e:  # moto or boto3 refused: show the server's side and stop it
        log_tail = state.log_file.read_text(errors="replace").splitlines()[-20:]
        print(f"{e}\n---- {state.log_file} ----", *log_tail, sep="\n", file=sys.stderr)
        server.terminate()
        try:
            server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
        state.pid_file.unlink(missing_ok=True)
        die(f"could not start the S3 server on {args.host}:{args.port} (log above)")
    endpoint = endpoint_of(args.host, args.port)
    print(f"S3 server (moto) running: PID {server.pid}, endpoint {endpoint}, bucket {args.bucket}")
    print(f"  state: {state.directory} (stop: scripts/s3-server.py stop --port {args.port})")
    if args.require_auth:
        print(f"  credentials: source {state.credentials_file}")
    else:
        print("  credentials: any non-empty AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def stop(args: argparse.Namespace, state: State) -> None:
    pid = running_pid(state)
    if pid is None:
        state.pid_file.unlink(missing_ok=True)
        print(
            f"S3 server on port {args.port} is not running (no live moto PID in {state.pid_file})"
        )
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while running_pid(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running_pid(state):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    state.pid_file.unlink(missing_ok=True)
    state.credentials_file.unlink(missing_ok=True)
    print(f"S3 server stopped (PID {pid})")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/s3-server.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="5555")
    parser.add_argument("--bucket", default="pcam-dvc")
    parser.add_argument("--require-auth", action="store_true")
    parser.add_argument("--public-read", action="store_true")
    parser.add_argument("--state-dir", type=Path)
    args = parser.parse_args(argv)
    if args.require_auth and args.public_read:
        die(
            "--require-auth and --public-read exclude each other (moto cannot serve anonymous "
            "reads while it checks signatures)"
        )
    if not LOOPBACK.fullmatch(args.host):
        die(
            f"--host {args.host} is not a loopback address: this test server has no "
            "authentication worth the name and must listen on 127.0.0.1 (or ::1) only"
        )
    if not args.port.isdigit() or not 1 <= int(args.port) <= 65535:
        die(f"--port '{args.port}' is not a TCP port number (1-65535)")
    args.port = int(args.port)
    if not BUCKET.fullmatch(args.bucket):
        die(
            f"--bucket '{args.bucket}' is not a valid S3 bucket name (3-63 characters: a-z 0-9 . -)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    state = State(args.state_dir or default_state_dir(args.port))
    if args.command == "start":
        start(args, state)
    elif args.command == "stop":
        stop(args, state)
    else:
        pid = running_pid(state)
        if pid is None:
            print("not running")
            return 3
        print(f"running: PID {pid} (state {state.directory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
