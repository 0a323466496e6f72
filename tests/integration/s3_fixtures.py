"""Helpers for tests/integration/test_remote.py: a real S3 server and small DVC repositories.

The S3 server is moto[server], started and stopped only through the project's own
scripts/s3-server.py, on a free loopback port. Repositories are real git + DVC repositories in
tmp directories; every DVC command runs as a subprocess the way a user would type it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT
from tests.integration.conftest import free_port, project_env, require_integration, run_command

SCRIPTS = REPO_ROOT / "scripts"
S3_SERVER = SCRIPTS / "s3-server.py"
REMOTE = SCRIPTS / "remote.py"
SHARED_CACHE = SCRIPTS / "shared-cache.sh"
GUARD = SCRIPTS / "check-no-credentials.py"

# What any client of the no-auth server may use (moto accepts any non-empty pair there).
ANY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# Nothing AWS-related leaks in from the developer's environment.
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def env(credentials: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The project environment (venv on PATH, DVC quiet) with exactly `credentials` for AWS."""
    base = project_env(**extra)
    for name in AWS_ENV_VARS:
        base.pop(name, None)
    # Empty AWS config/credentials files: botocore must not find the developer's ~/.aws.
    empty = Path(tempfile.gettempdir()) / "pcam-tests-empty-aws-config"
    if not empty.exists():
        empty.write_text("")
    base["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    base["AWS_CONFIG_FILE"] = str(empty)
    base["AWS_EC2_METADATA_DISABLED"] = "true"
    base.update(credentials or {})
    return base


def sh(
    cmd: list[str | Path],
    cwd: Path,
    *,
    credentials: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """Run a command like a user would; on an unexpected failure show its output."""
    return run_command(cmd, cwd=cwd, env=env(credentials, **extra), check=check, timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# --- the S3 server ------------------------------------------------------------------------------
@dataclass
class S3Server:
    """One moto server run through scripts/s3-server.py (start/stop by PID)."""

    state_dir: Path
    bucket: str
    port: int = field(default_factory=free_port)
    require_auth: bool = False
    public_read: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http_url(self, prefix: str) -> str:
        """The same objects over plain HTTP: what a read-only mirror of the bucket serves."""
        return f"{self.endpoint}/{self.bucket}/{prefix}"

    def s3_url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def _script(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(S3_SERVER),
                action,
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
                *args,
            ],
            env=env(),
            text=True,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def start(self) -> None:
        args = ["--bucket", self.bucket]
        if self.require_auth:
            args.append("--require-auth")
        if self.public_read:
            args.append("--public-read")
        result = self._script("start", *args)
        if result.returncode != 0:
            self._script("stop")  # whatever it left running, by the PID it recorded
            raise RuntimeError(f"scripts/s3-server.py start failed:\n{output(result)}")

    def stop(self) -> None:
        result = self._script("stop")
        if result.returncode != 0:
            raise RuntimeError(f"scripts/s3-server.py stop failed:\n{output(result)}")

    def pid(self) -> int | None:
        pid_file = self.state_dir / "server.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def credentials(self) -> dict[str, str]:
        """The keys of the IAM user the server made (--require-auth), else any pair."""
        if not self.require_auth:
            return dict(ANY_CREDENTIALS)
        pairs = {}
        for line in (self.state_dir / "credentials.env").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            pairs[name] = value
        return pairs

    def client(self, credentials: dict[str, str] | None = None) -> Any:
        import boto3

        creds = credentials or self.credentials()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str) -> list[str]:
        client = self.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/"
        ):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys


def start_server(state_dir: Path, bucket: str, **kwargs: Any) -> S3Server:
    """Start a server, or skip (fail under PCAM_REQUIRE_INTEGRATION=1) if moto is missing."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        require_integration(f"moto[server]/boto3 not installed ({e}): run 'make setup'")
    server = S3Server(state_dir=state_dir, bucket=bucket, **kwargs)
    server.start()
    return server


# --- repositories -------------------------------------------------------------------------------
def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> md5 of every file under root (following DVC's links)."""
    if root.is_file():
        return {root.name: md5(root)}
    return {str(p.relative_to(root)): md5(p) for p in sorted(root.rglob("*")) if p.is_file()}


def init_repo(path: Path) -> Path:
    """A git + DVC repository with one commit, its DVC state kept inside it."""
    path.mkdir(parents=True, exist_ok=True)
    sh(["git", "init", "-q", "-b", "main"], path)
    sh(["dvc", "init", "-q"], path)
    set_site_cache(path)
    commit(path, "dvc init")
    return path


def set_site_cache(repo: Path) -> None:
    """Keep DVC's site cache (state DB) per repository, out of /var/tmp/dvc."""
    sh(
        ["dvc", "config", "--local", "core.site_cache_dir", str(repo / ".dvc" / "tmp" / "site")],
        repo,
    )


def commit(repo: Path, message: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "--allow-empty", "-m", message], repo)


def make_raw_data(directory: Path, n_files: int = 3, size: int = 64_000, seed: int = 0) -> None:
    """Small stand-ins for data/raw: a few binary files and a text file."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32)
        (directory / f"part_{i}.h5").write_bytes(data)
    (directory / "README.txt").write_text(f"fake raw data, seed {seed}\n")


def bare_origin(repo: Path, origin: Path) -> Path:
    """A bare git repository on disk as the shared git remote 'origin' of `repo`."""
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], repo)
    sh(["git", "remote", "add", "origin", str(origin)], repo)
    sh(["git", "push", "-q", "origin", "main"], repo)
    return origin


def fresh_clone(origin: Path, path: Path) -> Path:
    """A new teammate's clone: git only, empty DVC cache, own site cache."""
    sh(["git", "clone", "-q", str(origin), str(path)], origin.parent)
    set_site_cache(path)
    assert not (path / ".dvc" / "cache").exists()
    return path


def cache_objects(cache: Path) -> dict[str, str]:
    """relative path -> md5 of the content, for every object file of a DVC cache."""
    files = cache / "files" / "md5"
    return {str(p.relative_to(files)): md5(p) for p in files.rglob("*") if p.is_file()}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def copy_repo(source: Path, target: Path) -> Path:
    """A full copy of a repository and its workspace; the DVC cache is hard-linked (read-only
    objects, so the source cannot be changed through the copy)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory).name == ".dvc":
            return {n for n in names if n in {"cache", "tmp", "site", "config.local"}}
        return set()

    shutil.copytree(source, target, symlinks=True, ignore=ignore)
    if (source / ".dvc" / "cache").exists():
        shutil.copytree(source / ".dvc" / "cache", target / ".dvc" / "cache", copy_function=os.link)
    set_site_cache(target)
    return target
