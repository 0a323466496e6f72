#!/usr/bin/env bash
# Local S3-compatible server (moto[server]) for trying out and testing the DVC remote.
#
#   scripts/s3-server.sh start  [--port 5555] [--host 127.0.0.1] [--bucket pcam-dvc]
#                               [--require-auth | --public-read] [--state-dir DIR]
#   scripts/s3-server.sh stop   [--port 5555] [--state-dir DIR]
#   scripts/s3-server.sh status [--port 5555] [--state-dir DIR]
#
# start: launches `python -m moto.server` on a loopback address only, waits until it answers,
#        creates the bucket and prints the endpoint. The PID, the log and (with --require-auth)
#        a credentials file live in the state directory (default: ${TMPDIR:-/tmp}/pcam-s3-UID-PORT).
#        Without --require-auth any non-empty AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY is accepted.
#        --public-read adds a bucket policy that lets anyone GET objects over plain HTTP (what a
#        read-only HTTP mirror of the bucket needs); anonymous writes stay refused.
#        With --require-auth the server creates an IAM user allowed s3:* on the bucket, writes its
#        keys to STATE_DIR/credentials.env (mode 600, `source` it), then enforces SigV4 signatures:
#        wrong keys are refused like on a real store.
# stop:  stops the server by the PID in the state directory (only if that PID is a moto server).
#
# moto keeps everything in memory: a stopped server loses its buckets and objects.
# The Python interpreter is $PCAM_PYTHON, else the project's .venv, else python3.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cmd="${1:-}"
[[ -n "$cmd" ]] || { usage >&2; exit 2; }
shift

host="127.0.0.1"
port="5555"
bucket="pcam-dvc"
require_auth=0
public_read=0
state_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) host="${2:?--host needs a value}"; shift 2 ;;
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --bucket) bucket="${2:?--bucket needs a value}"; shift 2 ;;
        --require-auth) require_auth=1; shift ;;
        --public-read) public_read=1; shift ;;
        --state-dir) state_dir="${2:?--state-dir needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see: scripts/s3-server.sh --help)" ;;
    esac
done

(( ! (require_auth && public_read) )) \
    || die "--require-auth and --public-read exclude each other (moto cannot serve anonymous \
reads while it checks signatures)"

case "$host" in
    127.*|::1|localhost) ;;
    *) die "--host $host is not a loopback address: this test server has no authentication \
worth the name and must listen on 127.0.0.1 (or ::1) only" ;;
esac
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
    die "--port '$port' is not a TCP port number (1-65535)"
fi
[[ "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] \
    || die "--bucket '$bucket' is not a valid S3 bucket name (3-63 characters: a-z 0-9 . -)"

state_dir="${state_dir:-${TMPDIR:-/tmp}/pcam-s3-$(id -u)-$port}"
pid_file="$state_dir/server.pid"
log_file="$state_dir/server.log"
cred_file="$state_dir/credentials.env"

python="$(project_python)"
helper="$scripts_dir/s3-server.py"
[[ -n "$python" && -x "$python" ]] || die "no Python interpreter found: run 'make setup' first"

# PID of the running server, or nothing. A PID file whose process is gone, is a zombie or is not
# a moto server (PID reused) counts as not running.
running_pid() {
    [[ -f "$pid_file" ]] || return 0
    local pid
    pid="$(cat "$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    [[ -r "/proc/$pid/cmdline" ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "moto.server" || return 0
    # Field 3 of /proc/PID/stat is the state; Z = zombie (exited, not reaped yet).
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 0
    echo "$pid"
}

start() {
    local pid
    pid="$(running_pid)"
    [[ -z "$pid" ]] || die "a server is already running (PID $pid, state $state_dir): \
run 'scripts/s3-server.sh stop --port $port' first"
    "$python" "$helper" installed 2>/dev/null \
        || die "moto[server] is not installed for $python: run 'make setup' \
(requirements.lock pins moto[server]) or set PCAM_PYTHON to an interpreter that has it"
    "$python" "$helper" port-free "$host" "$port" \
        || die "port $port on $host is already in use: pick another --port"

    mkdir -p "$state_dir"
    chmod 700 "$state_dir"
    rm -f "$cred_file"
    # stdin/stdout/stderr detached so that the server outlives this script and its caller's pipes.
    "$python" -m moto.server -H "$host" -p "$port" </dev/null >"$log_file" 2>&1 &
    pid=$!
    echo "$pid" >"$pid_file"

    local setup=(setup "$host" "$port" "$bucket" --pid "$pid")
    if (( public_read )); then setup+=(--public-read); fi
    if (( require_auth )); then setup+=(--require-auth --credentials-file "$cred_file"); fi
    if ! "$python" "$helper" "${setup[@]}"; then
        echo "---- $log_file ----" >&2
        tail -n 20 "$log_file" >&2 || true
        kill "$pid" 2>/dev/null || true
        rm -f "$pid_file"
        die "could not start the S3 server on $host:$port (log above)"
    fi

    local url_host="$host"
    [[ "$host" != *:* ]] || url_host="[$host]"
    echo "S3 server (moto) running: PID $pid, endpoint http://$url_host:$port, bucket $bucket"
    echo "  state: $state_dir (stop: scripts/s3-server.sh stop --port $port)"
    if (( require_auth )); then
        echo "  credentials: source $cred_file"
    else
        echo "  credentials: any non-empty AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    fi
}

stop() {
    local pid
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$pid_file"
        echo "S3 server on port $port is not running (no live moto PID in $pid_file)"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 50); do
        [[ -n "$(running_pid)" ]] || break
        sleep 0.1
    done
    if [[ -n "$(running_pid)" ]]; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pid_file" "$cred_file"
    echo "S3 server stopped (PID $pid)"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        pid="$(running_pid)"
        if [[ -n "$pid" ]]; then
            echo "running: PID $pid (state $state_dir)"
        else
            echo "not running"
            exit 3
        fi
        ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$cmd': use start, stop or status" ;;
esac
