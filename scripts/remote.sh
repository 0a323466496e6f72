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

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

python="$(project_python)"
dvc_bin="$(project_dvc)"
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
    "$python" "$scripts_dir/remote.py" credentials "$root" "$name"
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
    local args=("$root" "$name")
    if (( write )); then args+=(--write); fi
    "$python" "$scripts_dir/remote.py" check "${args[@]}"
}

cmd_show() {
    local root
    root="$(repo_root)"
    "$python" "$scripts_dir/remote.py" show "$root"
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
