#!/usr/bin/env python3
"""Configure the project's DVC remote: S3 or any S3-compatible store (SURF Object Store, MinIO,
Ceph). Run it from inside the repository (any subdirectory).

  scripts/remote.py add NAME s3://BUCKET/PREFIX [--endpoint URL] [--region REGION]
                        [--profile AWS_PROFILE] [--default] [--local] [--no-verify]
      Adds (or replaces) the remote in .dvc/config (committed; no secrets in it) or, with --local,
      in .dvc/config.local. Sets `verify true`: every object downloaded is re-hashed, so a
      corrupted object on the store is refused instead of being checked out (DVC's default is
      to trust the store).
  scripts/remote.py credentials NAME
      Copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if set) from the
      environment into .dvc/config.local (git-ignored, mode 600), without putting the secret on
      any command line. Alternative: keep them only in the environment or ~/.aws/credentials.
  scripts/remote.py mirror NAME https://HOST/BUCKET/PREFIX [--default-local] [--no-verify]
      Adds a read-only HTTP(S) mirror of the same objects (the bucket must allow anonymous
      GetObject). Pull-only users need no credentials: `dvc pull -r NAME`, or --default-local
      makes it their default remote (in .dvc/config.local). `dvc push` to it is refused by the
      store.
  scripts/remote.py check [NAME] [--write]
      Talks to the S3 remote with the same credentials DVC would use and explains what is wrong
      (unknown key, wrong secret, no permission, no bucket, endpoint down). --write also tests a
      write (puts and deletes one small object under the remote's prefix).
  scripts/remote.py show
      Lists the remotes and where credentials come from (never prints a secret).

It runs under $PCAM_PYTHON, else the interpreter here if it has dvc, else the project's .venv.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from toolenv import die, importable, use_project_python

use_project_python("dvc", "boto3")
if not importable("dvc"):
    die("dvc not found: run 'make setup' (it installs dvc and dvc-s3 into .venv)")

from dvc.config import Config, ConfigError  # noqa: E402  (after choosing the interpreter)

SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?")
ENDPOINT = re.compile(r"https?://[^/@]+(/.*)?")
LOOPBACK_HTTP = re.compile(r"http://(127\.|localhost|\[::1\])")
MIRROR_URL = re.compile(r"https?://[^/@]+/.+")


def repo_root() -> str:
    """The DVC repository around the working directory."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo.find_root()
    except NotDvcRepoError:
        die(f"not inside a DVC repository (no .dvc/ above {os.getcwd()}): cd into your clone first")


def valid_name(name: str) -> str:
    """The remote's name as DVC stores it (lower case)."""
    if not NAME.fullmatch(name):
        die(f"remote name '{name}' is not valid: use letters, digits, '_', '.', '-'")
    return name.lower()


def require_local_config_ignored(root: str) -> None:
    """Fails if .dvc/config.local would be committed."""

    def git(*args: str) -> bool:
        run = subprocess.run(["git", "-C", root, *args], capture_output=True, check=False)
        return run.returncode == 0

    if not git("rev-parse", "--git-dir"):
        return
    if git("ls-files", "--error-unmatch", ".dvc/config.local"):
        die(
            ".dvc/config.local is tracked by git, so credentials would be committed: "
            "run 'git rm --cached .dvc/config.local' (and rotate any key it held)"
        )
    if not git("check-ignore", "-q", ".dvc/config.local"):
        die(".dvc/config.local is not git-ignored: add '/config.local' to .dvc/.gitignore")


@contextmanager
def edit(root: str, level: str) -> Iterator[dict[str, Any]]:
    """A level of the config (repo: .dvc/config, local: .dvc/config.local) to change, through
    DVC's config API (what `dvc remote add/modify` use): validated, then written."""
    try:
        with load(root).edit(level) as conf:
            yield conf
    except ConfigError as e:
        die(f"{e}: the DVC config was not changed")


def add(
    name: str,
    url: str,
    *,
    endpoint: str,
    region: str,
    profile: str,
    default: bool,
    local: bool,
    verify: bool,
) -> None:
    name = valid_name(name)
    if "@" in url:
        die(
            f"remote URL '{url}' contains '@': never put credentials in the URL; use the "
            f"environment or 'scripts/remote.py credentials {name}'"
        )
    if not S3_URL.fullmatch(url):
        die(f"remote URL '{url}' is not s3://BUCKET[/PREFIX] (bucket: 3-63 characters a-z 0-9 . -)")
    if endpoint:
        if not ENDPOINT.fullmatch(endpoint):
            die(f"--endpoint '{endpoint}' must be http(s)://HOST[:PORT] without credentials")
        if not (endpoint.startswith("https://") or LOOPBACK_HTTP.match(endpoint)):
            print(
                f"remote.py: warning: --endpoint {endpoint} is plain http: data and request "
                "signatures travel unencrypted",
                file=sys.stderr,
            )
    settings = {"url": url}
    for key, value in (("endpointurl", endpoint), ("region", region), ("profile", profile)):
        if value:
            settings[key] = value
    settings["verify"] = str(verify).lower()
    with edit(repo_root(), "local" if local else "repo") as conf:
        conf["remote"][name] = settings
        if default:
            conf["core"]["remote"] = name
    shown = f" (endpoint {endpoint})" if endpoint else ""
    print(f"remote '{name}' -> {url}{shown}, verify={settings['verify']}")
    print(
        "credentials: export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run "
        f"'scripts/remote.py credentials {name}' to keep them in .dvc/config.local"
    )


def mirror(name: str, url: str, *, default_local: bool, verify: bool) -> None:
    name = valid_name(name)
    if not MIRROR_URL.fullmatch(url):
        die(
            f"mirror URL '{url}' must be http(s)://HOST/BUCKET/PREFIX, the same objects as the S3 "
            "remote, readable anonymously, and without credentials in it"
        )
    root = repo_root()
    with edit(root, "repo") as conf:
        conf["remote"][name] = {"url": url, "verify": str(verify).lower()}
    if default_local:
        with edit(root, "local") as conf:
            conf["core"]["remote"] = name
    print(f"read-only mirror '{name}' -> {url} (pull with: dvc pull -r {name})")


def load(root: str) -> Config:
    return Config(os.path.join(root, ".dvc"))


def credentials(name: str) -> None:
    """Copy AWS_* from the environment into .dvc/config.local (mode 600): through DVC's own config
    API (what `dvc remote modify --local` uses), so the secret is never an argument of a process
    that other users could see in `ps`."""
    name = valid_name(name)
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        die(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set in the environment (e.g. "
            "'read -rs AWS_SECRET_ACCESS_KEY; export AWS_SECRET_ACCESS_KEY') so they never appear "
            "on a command line"
        )
    root = repo_root()
    require_local_config_ignored(root)
    if name not in load(root)["remote"]:
        die(
            f"no remote named '{name}' in .dvc/config or .dvc/config.local: "
            f"run 'scripts/remote.py add {name} s3://BUCKET/PREFIX' first"
        )
    with edit(root, "local") as conf:
        remote = conf["remote"].setdefault(name, {})
        remote["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
        remote["secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            remote["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        else:
            remote.pop("session_token", None)
    local = Path(root) / ".dvc" / "config.local"
    local.chmod(0o600)
    print(f"credentials for remote '{name}' stored in {local} (git-ignored, mode 600)")


def show(root: str) -> None:
    """The remotes and where each one's credentials come from; never a secret."""
    config = load(root)
    default = config["core"].get("remote")
    committed_level = config.load_one("repo").get("remote", {})
    if not config["remote"]:
        print("no remotes: scripts/remote.py add NAME s3://BUCKET/PREFIX --endpoint URL --default")
    for name, remote in config["remote"].items():
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}: {remote['url']}")
        for key in ("endpointurl", "region", "profile", "verify"):
            if key in remote:
                print(f"  {key} = {remote[key]}")
        source = credentials_source(name, remote, committed_level.get(name, {}))
        if source:
            print(f"  credentials: {source}")


def credentials_source(name: str, remote: dict[str, Any], committed: dict[str, Any]) -> str:
    """Where the remote's credentials come from ("" when it needs none: not S3)."""
    secrets = [key for key in SECRET_KEYS if key in remote]
    in_config = [key for key in secrets if key in committed]
    if in_config:
        return (
            f"{', '.join(in_config)} in .dvc/config, which is COMMITTED: remove them there and "
            f"run 'scripts/remote.py credentials {name}' (and rotate the key)"
        )
    if secrets:
        return f"{', '.join(secrets)} in .dvc/config.local (not committed)"
    if remote["url"].startswith("s3://"):
        return "environment / ~/.aws (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    return ""


# --- check: talk to the store as DVC would, and explain a refusal ---------------------------------


def fail(message: str) -> NoReturn:
    sys.exit(f"remote.py check: {message}")


@dataclass(frozen=True)
class S3Remote:
    name: str
    settings: dict[str, Any]
    bucket: str
    prefix: str

    @property
    def endpoint(self) -> str | None:
        return self.settings.get("endpointurl")

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint or 'AWS'}"


def s3_remote(root: str, name: str) -> S3Remote:
    """The remote NAME (or the default one), which must be S3."""
    config = load(root)
    name = name or config["core"].get("remote", "")
    if not name:
        fail("no remote given and no default remote: scripts/remote.py check NAME")
    if name not in config["remote"]:
        fail(f"no remote named '{name}': see 'dvc remote list'")
    settings = config["remote"][name]
    url = settings["url"]
    if not url.startswith("s3://"):
        fail(f"remote '{name}' is {url}, not S3: for an HTTP mirror try 'dvc pull -r {name}'")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return S3Remote(name, settings, bucket, prefix.strip("/"))


def session_for(remote: S3Remote) -> tuple[Any, str]:
    """A boto3 session with the credentials DVC would use, and where they come from."""
    import boto3
    import botocore.exceptions

    settings, kwargs = remote.settings, {}
    if settings.get("profile"):
        kwargs["profile_name"] = settings["profile"]
    if settings.get("access_key_id"):
        kwargs.update(
            aws_access_key_id=settings["access_key_id"],
            aws_secret_access_key=settings.get("secret_access_key"),
            aws_session_token=settings.get("session_token"),
        )
        source = ".dvc/config.local (or .dvc/config)"
    elif settings.get("profile"):
        source = f"AWS profile '{settings['profile']}'"
    else:
        source = "the environment / ~/.aws (botocore's default chain)"
    try:
        return boto3.session.Session(**kwargs), source
    except botocore.exceptions.ProfileNotFound as e:
        fail(f"{e}: fix 'profile' of remote '{remote.name}' or create it in ~/.aws/credentials")


def refusal_reasons(remote: S3Remote, shown: str, fix: str) -> dict[str, str]:
    """What each S3 error code means here, and the fix."""
    return {
        "InvalidAccessKeyId": f"the store does not know access key id {shown}. Fix: {fix}",
        "SignatureDoesNotMatch": f"the secret access key does not match key id {shown}. Fix: {fix}",
        "InvalidClientTokenId": f"the store does not know access key id {shown}. Fix: {fix}",
        "ExpiredToken": f"the session token of key {shown} has expired: get fresh credentials",
        "AccessDenied": (
            f"key {shown} is valid but may not use {remote.where}: ask the bucket owner for access"
        ),
        "NoSuchBucket": (
            f"bucket '{remote.bucket}' does not exist at {remote.endpoint or 'AWS'}: check the url "
            f"of remote '{remote.name}' (dvc remote modify {remote.name} url s3://BUCKET/PREFIX)"
        ),
    }


def check(root: str, name: str, write: bool) -> None:
    """List one key under the remote's prefix; with `write`, also put and delete one object."""
    import botocore.exceptions
    from botocore.config import Config as BotoConfig

    remote = s3_remote(root, name)
    session, source = session_for(remote)
    fix = (
        f"export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or 'scripts/remote.py credentials "
        f"{remote.name}' to store them in .dvc/config.local"
    )
    creds = session.get_credentials()
    if creds is None:
        fail(f"no credentials found for remote '{remote.name}' (looked in {source}). Fix: {fix}")
    key_id = creds.access_key or ""
    shown = f"{key_id[:4]}...{key_id[-4:]}" if len(key_id) > 8 else "(short key id)"
    client = session.client(
        "s3",
        endpoint_url=remote.endpoint,
        region_name=remote.settings.get("region") or "us-east-1",
        config=BotoConfig(retries={"max_attempts": 2}, connect_timeout=5),
    )
    reasons = refusal_reasons(remote, shown, fix)

    def call(what: str, request: Callable[..., Any], **kwargs: Any) -> None:
        try:
            request(**kwargs)
        except botocore.exceptions.EndpointConnectionError:
            fail(
                f"cannot reach {remote.endpoint or 'AWS'} ({what}): is the endpoint right and the "
                f"store up? (dvc remote modify {remote.name} endpointurl URL)"
            )
        except botocore.exceptions.ClientError as e:
            error = e.response.get("Error", {})
            code = error.get("Code", "")
            reason = reasons.get(code, error.get("Message", str(e)))
            fail(f"{what} on {remote.where} refused: {code}: {reason}")

    under = f"{remote.prefix}/" if remote.prefix else ""
    call("list", client.list_objects_v2, Bucket=remote.bucket, Prefix=under, MaxKeys=1)
    print(f"remote '{remote.name}': read OK ({remote.where}, key {shown} from {source})")
    if write:
        key = f"{under}.remote-check-{uuid.uuid4().hex}"
        call("write", client.put_object, Bucket=remote.bucket, Key=key, Body=b"remote.py check\n")
        call("delete", client.delete_object, Bucket=remote.bucket, Key=key)
        print(f"remote '{remote.name}': write OK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/remote.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_cmd = commands.add_parser("add", help="add (or replace) an S3 remote")
    add_cmd.add_argument("name")
    add_cmd.add_argument("url", help="s3://BUCKET/PREFIX")
    add_cmd.add_argument("--endpoint", default="", help="http(s)://HOST[:PORT] of the store")
    add_cmd.add_argument("--region", default="")
    add_cmd.add_argument("--profile", default="", help="an AWS profile (~/.aws)")
    add_cmd.add_argument("--default", action="store_true", help="make it the default remote")
    add_cmd.add_argument("--local", action="store_true", help="in .dvc/config.local")
    add_cmd.add_argument("--no-verify", dest="verify", action="store_false")
    commands.add_parser("credentials", help="AWS_* from the environment into .dvc/config.local")
    commands.choices["credentials"].add_argument("name")
    mirror_cmd = commands.add_parser("mirror", help="a read-only HTTP(S) mirror")
    mirror_cmd.add_argument("name")
    mirror_cmd.add_argument("url", help="https://HOST/BUCKET/PREFIX")
    mirror_cmd.add_argument("--default-local", action="store_true")
    mirror_cmd.add_argument("--no-verify", dest="verify", action="store_false")
    check_cmd = commands.add_parser("check", help="talk to the store as DVC would")
    check_cmd.add_argument("name", nargs="?", default="")
    check_cmd.add_argument("--write", action="store_true")
    commands.add_parser("show", help="the remotes and where their credentials come from")
    args = parser.parse_args(argv)
    if args.command == "add":
        add(
            args.name,
            args.url,
            endpoint=args.endpoint,
            region=args.region,
            profile=args.profile,
            default=args.default,
            local=args.local,
            verify=args.verify,
        )
    elif args.command == "credentials":
        credentials(args.name)
    elif args.command == "mirror":
        mirror(args.name, args.url, default_local=args.default_local, verify=args.verify)
    elif args.command == "check":
        check(repo_root(), args.name, args.write)
    else:
        show(repo_root())


if __name__ == "__main__":
    main()
