#!/usr/bin/env bash
# Configure the project's DVC remote: S3 or any S3-compatible store (SURF Object Store, MinIO, Ceph).
# Run it from inside the repository (any subdirectory).
#
#   scripts/remote.sh add NAME s3://BUCKET/PREFIX [--endpoint URL] [--region REGION]
#                         [--profile AWS_PROFILE] [--default] [--local] [--no-verify]
#       Adds (or replaces) the remote in .dvc/config (committed; no secrets in it) or, with --local,
#       in .dvc/config.local. Sets `verify true`: every object downloaded is re-hashed, so a
#       corrupted object on the store is refused instead of being checked out (DVC's default is
#       to trust the store).
#   scripts/remote.sh credentials NAME
#       Copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if set) from the
#       environment into .dvc/config.local (git-ignored, mode 600), without putting the secret on
#       any command line. Alternative: keep them only in the environment or ~/.aws/credentials.
#   scripts/remote.sh mirror NAME https://HOST/BUCKET/PREFIX [--default-local] [--no-verify]
#       Adds a read-only HTTP(S) mirror of the same objects (the bucket must allow anonymous
#       GetObject). Pull-only users need no credentials: `dvc pull -r NAME`, or --default-local
#       makes it their default remote (in .dvc/config.local). `dvc push` to it is refused by the store.
#   scripts/remote.sh check [NAME] [--write]
#       Talks to the S3 remote with the same credentials DVC would use and explains what is wrong
#       (unknown key, wrong secret, no permission, no bucket, endpoint down). --write also tests a
#       write (puts and deletes one small object under the remote's prefix).
#   scripts/remote.sh show
#       Lists the remotes and where credentials come from (never prints a secret).
set -euo pipefail

repo_script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project_root="$(cd "$repo_script_dir/.." && pwd)"

usage() {
    # The comment block at the top of this file, without the '# '.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

die() {
    echo "remote.sh: error: $*" >&2
    exit 1
}

if [[ -n "${PCAM_PYTHON:-}" ]]; then
    python="$PCAM_PYTHON"
elif [[ -x "$project_root/.venv/bin/python" ]]; then
    python="$project_root/.venv/bin/python"
else
    python="$(command -v python3 || true)"
fi
dvc_bin="$(dirname "$python")/dvc"
[[ -x "$dvc_bin" ]] || dvc_bin="$(command -v dvc || true)"
[[ -n "$dvc_bin" ]] || die "dvc not found: run 'make setup' (it installs dvc and dvc-s3 into .venv)"

dvc() { "$dvc_bin" "$@"; }

repo_root() {
    local root
    root="$(dvc root 2>/dev/null)" \
        || die "not inside a DVC repository (no .dvc/ above $(pwd)): cd into your clone first"
    (cd "$root" && pwd)
}

valid_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] \
        || die "remote name '$1' is not valid: use letters, digits, '_', '.', '-'"
}

# Fails if .dvc/config.local would be committed.
require_local_config_ignored() {
    local root="$1"
    if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
        if git -C "$root" ls-files --error-unmatch .dvc/config.local >/dev/null 2>&1; then
            die ".dvc/config.local is tracked by git, so credentials would be committed: \
run 'git rm --cached .dvc/config.local' (and rotate any key it held)"
        fi
        git -C "$root" check-ignore -q .dvc/config.local \
            || die ".dvc/config.local is not git-ignored: add '/config.local' to .dvc/.gitignore"
    fi
}

cmd_add() {
    local name="${1:-}" url="${2:-}"
    [[ -n "$name" && -n "$url" ]] || die "usage: scripts/remote.sh add NAME s3://BUCKET/PREFIX [options]"
    shift 2
    local endpoint="" region="" profile="" default=0 level=() verify=true
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --endpoint) endpoint="${2:?--endpoint needs a URL}"; shift 2 ;;
            --region) region="${2:?--region needs a value}"; shift 2 ;;
            --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
            --default) default=1; shift ;;
            --local) level=(--local); shift ;;
            --no-verify) verify=false; shift ;;
            *) die "add: unknown option '$1'" ;;
        esac
    done
    valid_name "$name"
    [[ "$url" != *@* ]] || die "remote URL '$url' contains '@': never put credentials in the URL; \
use the environment or 'scripts/remote.sh credentials $name'"
    [[ "$url" =~ ^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$ ]] \
        || die "remote URL '$url' is not s3://BUCKET[/PREFIX] (bucket: 3-63 characters a-z 0-9 . -)"
    if [[ -n "$endpoint" ]]; then
        [[ "$endpoint" =~ ^https?://[^/@]+(/.*)?$ ]] \
            || die "--endpoint '$endpoint' must be http(s)://HOST[:PORT] without credentials"
        [[ "$endpoint" == https://* || "$endpoint" =~ ^http://(127\.|localhost|\[::1\]) ]] \
            || echo "remote.sh: warning: --endpoint $endpoint is plain http: data and request \
signatures travel unencrypted" >&2
    fi
    local root
    root="$(repo_root)"
    cd "$root"
    local flags=(-f)
    (( default )) && flags+=(-d)
    dvc remote add "${level[@]}" "${flags[@]}" "$name" "$url"
    [[ -z "$endpoint" ]] || dvc remote modify "${level[@]}" "$name" endpointurl "$endpoint"
    [[ -z "$region" ]] || dvc remote modify "${level[@]}" "$name" region "$region"
    [[ -z "$profile" ]] || dvc remote modify "${level[@]}" "$name" profile "$profile"
    dvc remote modify "${level[@]}" "$name" verify "$verify"
    echo "remote '$name' -> $url${endpoint:+ (endpoint $endpoint)}, verify=$verify"
    echo "credentials: export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run" \
        "'scripts/remote.sh credentials $name' to keep them in .dvc/config.local"
}

cmd_credentials() {
    local name="${1:-}"
    [[ -n "$name" ]] || die "usage: scripts/remote.sh credentials NAME (reads AWS_* from the environment)"
    valid_name "$name"
    [[ -n "${AWS_ACCESS_KEY_ID:-}" && -n "${AWS_SECRET_ACCESS_KEY:-}" ]] \
        || die "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set in the environment \
(e.g. 'read -rs AWS_SECRET_ACCESS_KEY; export AWS_SECRET_ACCESS_KEY') so they never appear \
on a command line"
    local root
    root="$(repo_root)"
    require_local_config_ignored "$root"
    # dvc's own config API (what `dvc remote modify --local` uses), fed from the environment: the
    # secret is never an argument of any process, so other users cannot see it in `ps`.
    "$python" - "$root" "$name" <<'EOF'
import os
import sys

from dvc.config import Config

root, name = sys.argv[1], sys.argv[2]
config = Config(os.path.join(root, ".dvc"))
if name not in config["remote"]:
    sys.exit(f"remote.sh: error: no remote named '{name}' in .dvc/config or .dvc/config.local: "
             f"run 'scripts/remote.sh add {name} s3://BUCKET/PREFIX' first")
with config.edit("local") as conf:
    remote = conf["remote"].setdefault(name, {})
    remote["access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
    remote["secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    if os.environ.get("AWS_SESSION_TOKEN"):
        remote["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    else:
        remote.pop("session_token", None)
EOF
    chmod 600 "$root/.dvc/config.local"
    echo "credentials for remote '$name' stored in $root/.dvc/config.local (git-ignored, mode 600)"
}

cmd_mirror() {
    local name="${1:-}" url="${2:-}"
    [[ -n "$name" && -n "$url" ]] || die "usage: scripts/remote.sh mirror NAME https://HOST/BUCKET/PREFIX"
    shift 2
    local default_local=0 verify=true
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --default-local) default_local=1; shift ;;
            --no-verify) verify=false; shift ;;
            *) die "mirror: unknown option '$1'" ;;
        esac
    done
    valid_name "$name"
    [[ "$url" =~ ^https?://[^/@]+/.+$ ]] \
        || die "mirror URL '$url' must be http(s)://HOST/BUCKET/PREFIX, the same objects as the S3 \
remote, readable anonymously, and without credentials in it"
    local root
    root="$(repo_root)"
    cd "$root"
    dvc remote add -f "$name" "$url"
    dvc remote modify "$name" verify "$verify"
    if (( default_local )); then
        dvc remote default --local "$name"
    fi
    echo "read-only mirror '$name' -> $url (pull with: dvc pull -r $name)"
}

cmd_check() {
    local name="" write=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --write) write=1; shift ;;
            -*) die "check: unknown option '$1'" ;;
            *) name="$1"; shift ;;
        esac
    done
    local root
    root="$(repo_root)"
    "$python" - "$root" "$name" "$write" <<'EOF'
import os
import sys
import uuid

from dvc.config import Config

root, name, write = sys.argv[1], sys.argv[2], sys.argv[3] == "1"


def fail(msg: str) -> None:
    sys.exit(f"remote.sh check: {msg}")


config = Config(os.path.join(root, ".dvc"))
name = name or config["core"].get("remote", "")
if not name:
    fail("no remote given and no default remote: scripts/remote.sh check NAME")
if name not in config["remote"]:
    fail(f"no remote named '{name}': see 'dvc remote list'")
rc = config["remote"][name]
url = rc["url"]
if not url.startswith("s3://"):
    fail(f"remote '{name}' is {url}, not S3: for an HTTP mirror try 'dvc pull -r {name}'")
bucket, _, prefix = url[len("s3://"):].partition("/")
prefix = prefix.strip("/")
endpoint = rc.get("endpointurl")
where = f"s3://{bucket}/{prefix} at {endpoint or 'AWS'}"

import boto3
import botocore.exceptions as bex
from botocore.config import Config as BotoConfig

session_kwargs = {}
if rc.get("profile"):
    session_kwargs["profile_name"] = rc["profile"]
if rc.get("access_key_id"):
    session_kwargs.update(aws_access_key_id=rc["access_key_id"],
                          aws_secret_access_key=rc.get("secret_access_key"),
                          aws_session_token=rc.get("session_token"))
    source = ".dvc/config.local (or .dvc/config)"
elif rc.get("profile"):
    source = f"AWS profile '{rc['profile']}'"
else:
    source = "the environment / ~/.aws (botocore's default chain)"
try:
    session = boto3.session.Session(**session_kwargs)
except bex.ProfileNotFound as e:
    fail(f"{e}: fix 'profile' of remote '{name}' or create it in ~/.aws/credentials")
creds = session.get_credentials()
fix = (f"export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or 'scripts/remote.sh credentials {name}'"
       " to store them in .dvc/config.local")
if creds is None:
    fail(f"no credentials found for remote '{name}' (looked in {source}). Fix: {fix}")
key_id = creds.access_key or ""
shown = f"{key_id[:4]}...{key_id[-4:]}" if len(key_id) > 8 else "(short key id)"
client = session.client("s3", endpoint_url=endpoint, region_name=rc.get("region") or "us-east-1",
                        config=BotoConfig(retries={"max_attempts": 2}, connect_timeout=5))
explain = {
    "InvalidAccessKeyId": f"the store does not know access key id {shown}. Fix: {fix}",
    "SignatureDoesNotMatch": f"the secret access key does not match key id {shown}. Fix: {fix}",
    "InvalidClientTokenId": f"the store does not know access key id {shown}. Fix: {fix}",
    "ExpiredToken": f"the session token of key {shown} has expired: get fresh credentials",
    "AccessDenied": f"key {shown} is valid but may not use {where}: ask the bucket owner for access",
    "NoSuchBucket": f"bucket '{bucket}' does not exist at {endpoint or 'AWS'}: check the url "
                    f"of remote '{name}' (dvc remote modify {name} url s3://BUCKET/PREFIX)",
}


def call(what: str, fn, **kw):
    try:
        return fn(**kw)
    except bex.EndpointConnectionError:
        fail(f"cannot reach {endpoint or 'AWS'} ({what}): is the endpoint right and the store up? "
             f"(dvc remote modify {name} endpointurl URL)")
    except bex.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        fail(f"{what} on {where} refused: {code}: "
             + explain.get(code, e.response.get("Error", {}).get("Message", str(e))))


call("list", client.list_objects_v2, Bucket=bucket, Prefix=prefix + "/" if prefix else "",
     MaxKeys=1)
print(f"remote '{name}': read OK ({where}, key {shown} from {source})")
if write:
    key = f"{prefix + '/' if prefix else ''}.remote-check-{uuid.uuid4().hex}"
    call("write", client.put_object, Bucket=bucket, Key=key, Body=b"remote.sh check\n")
    call("delete", client.delete_object, Bucket=bucket, Key=key)
    print(f"remote '{name}': write OK")
EOF
}

cmd_show() {
    local root
    root="$(repo_root)"
    "$python" - "$root" <<'EOF'
import os
import sys

from dvc.config import Config

root = sys.argv[1]
config = Config(os.path.join(root, ".dvc"))
default = config["core"].get("remote")
levels = {lvl: config.load_one(lvl).get("remote", {}) for lvl in ("repo", "local")}
if not config["remote"]:
    print("no remotes: scripts/remote.sh add NAME s3://BUCKET/PREFIX --endpoint URL --default")
for name, rc in config["remote"].items():
    mark = " (default)" if name == default else ""
    print(f"{name}{mark}: {rc['url']}")
    for key in ("endpointurl", "region", "profile", "verify"):
        if key in rc:
            print(f"  {key} = {rc[key]}")
    secret_keys = [k for k in ("access_key_id", "secret_access_key", "session_token") if k in rc]
    committed = [k for k in secret_keys if k in levels["repo"].get(name, {})]
    if committed:
        print(f"  credentials: {', '.join(committed)} in .dvc/config, which is COMMITTED: remove "
              f"them there and run 'scripts/remote.sh credentials {name}' (and rotate the key)")
    elif secret_keys:
        print(f"  credentials: {', '.join(secret_keys)} in .dvc/config.local (not committed)")
    elif rc["url"].startswith("s3://"):
        print("  credentials: environment / ~/.aws (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
EOF
}

sub="${1:-}"
[[ -n "$sub" ]] || { usage >&2; exit 2; }
shift
case "$sub" in
    add) cmd_add "$@" ;;
    credentials) cmd_credentials "$@" ;;
    mirror) cmd_mirror "$@" ;;
    check) cmd_check "$@" ;;
    show) cmd_show "$@" ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$sub': use add, credentials, mirror, check or show" ;;
esac
