"""The Python half of scripts/remote.sh: what needs DVC's config API or boto3.

Run by remote.sh, with the interpreter that has dvc (the project's .venv), as
`remote.py credentials ROOT NAME`, `remote.py check ROOT [NAME] [--write]` or `remote.py show ROOT`;
ROOT is the repository. Its messages are remote.sh's (see that file for the commands).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from dvc.config import Config

SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")


def load(root: str) -> Config:
    return Config(os.path.join(root, ".dvc"))


def credentials(root: str, name: str) -> None:
    """Copy AWS_* from the environment into .dvc/config.local: through DVC's own config API
    (what `dvc remote modify --local` uses), so the secret is never an argument of a process
    that other users could see in `ps`."""
    config = load(root)
    if name not in config["remote"]:
        sys.exit(
            f"remote.sh: error: no remote named '{name}' in .dvc/config or .dvc/config.local: "
            f"run 'scripts/remote.sh add {name} s3://BUCKET/PREFIX' first"
        )
    with config.edit("local") as conf:
        remote = conf["remote"].setdefault(name, {})
        remote["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
        remote["secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            remote["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        else:
            remote.pop("session_token", None)


def show(root: str) -> None:
    """The remotes and where each one's credentials come from; never a secret."""
    config = load(root)
    default = config["core"].get("remote")
    committed_level = config.load_one("repo").get("remote", {})
    if not config["remote"]:
        print("no remotes: scripts/remote.sh add NAME s3://BUCKET/PREFIX --endpoint URL --default")
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
            f"run 'scripts/remote.sh credentials {name}' (and rotate the key)"
        )
    if secrets:
        return f"{', '.join(secrets)} in .dvc/config.local (not committed)"
    if remote["url"].startswith("s3://"):
        return "environment / ~/.aws (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    return ""


# --- check: talk to the store as DVC would, and explain a refusal ---------------------------------


def fail(message: str) -> NoReturn:
    sys.exit(f"remote.sh check: {message}")


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
        fail("no remote given and no default remote: scripts/remote.sh check NAME")
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
        f"export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or 'scripts/remote.sh credentials "
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
        call("write", client.put_object, Bucket=remote.bucket, Key=key, Body=b"remote.sh check\n")
        call("delete", client.delete_object, Bucket=remote.bucket, Key=key)
        print(f"remote '{remote.name}': write OK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/remote.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("credentials", "check", "show"):
        commands.add_parser(command).add_argument("root")
    commands.choices["credentials"].add_argument("name")
    commands.choices["check"].add_argument("name", nargs="?", default="")
    commands.choices["check"].add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "credentials":
        credentials(args.root, args.name)
    elif args.command == "check":
        check(args.root, args.name, args.write)
    else:
        show(args.root)


if __name__ == "__main__":
    main()
