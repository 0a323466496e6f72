"""The Python half of scripts/s3-server.sh: is the port free, and set up a moto server just started.

Run by s3-server.sh with the interpreter that has moto[server] (the project's .venv):
  s3-server.py installed                  exit 0 when moto[server] and boto3 can be imported
  s3-server.py port-free HOST PORT        exit 0 when nothing listens on HOST:PORT
  s3-server.py setup HOST PORT BUCKET --pid PID [--public-read]
                     [--require-auth --credentials-file FILE]
                                          wait for the server (PID) to answer, create BUCKET, and
                                          the policy or the IAM user s3-server.sh describes
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

STARTUP_SECONDS = 60
BOOTSTRAP_KEYS = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
USER = "pcam-dvc"


def installed() -> bool:
    try:
        for name in ("moto.server", "boto3", "flask"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        return probe.connect_ex((host, port)) != 0


def endpoint_of(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def wait_until_up(endpoint: str, pid: int) -> None:
    """Until the server answers; exits if its process ends or it takes too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            if not Path(f"/proc/{pid}").exists() or time.monotonic() > deadline:
                sys.exit(f"the server did not come up on {endpoint}")
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
    fd = os.open(credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"export AWS_ACCESS_KEY_ID={key['AccessKeyId']}\n")
        f.write(f"export AWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}\n")
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=5).close()


def setup(args: argparse.Namespace) -> None:
    import boto3

    endpoint = endpoint_of(args.host, args.port)
    wait_until_up(endpoint, args.pid)
    clients = {"endpoint_url": endpoint, "region_name": "us-east-1", **BOOTSTRAP_KEYS}
    s3 = boto3.client("s3", **clients)
    s3.create_bucket(Bucket=args.bucket)
    if args.public_read:
        allow_public_read(s3, args.bucket)
    if args.require_auth:
        require_auth(boto3.client("iam", **clients), endpoint, args.bucket, args.credentials_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/s3-server.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("installed")
    for name in ("port-free", "setup"):
        command = commands.add_parser(name)
        command.add_argument("host")
        command.add_argument("port", type=int)
    commands.choices["setup"].add_argument("bucket")
    commands.choices["setup"].add_argument("--pid", type=int, required=True)
    commands.choices["setup"].add_argument("--public-read", action="store_true")
    commands.choices["setup"].add_argument("--require-auth", action="store_true")
    commands.choices["setup"].add_argument("--credentials-file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "installed":
        return 0 if installed() else 1
    if args.command == "port-free":
        return 0 if port_free(args.host, args.port) else 1
    if args.require_auth and args.credentials_file is None:
        parser.error("--require-auth needs --credentials-file")
    setup(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
