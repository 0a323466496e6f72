# shellcheck shell=bash
# What containers/build.sh and containers/publish.sh share: their errors and help, the container
# engine, the project's version. Sourced (never executed):
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   (after cd to the repository root)

PCAM_TOOL="containers/${0##*/}" # the command the messages name

die() {
    echo "$PCAM_TOOL: error: $*" >&2
    exit 1
}
note() { echo "$PCAM_TOOL: $*" >&2; }

usage() {
    # The comment block at the top of the command's file, without the '# '.
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# pick_engine [plan]: set ENGINE to PCAM_ENGINE (docker | podman, which must be on PATH), else the
# first that works: docker with a reachable daemon, else podman. With `plan` (what `build.sh plan`
# and a PCAM_DRY_RUN=1 publish print) nothing need be installed: PCAM_ENGINE as given, else the one
# found, else podman.
ENGINE=""
pick_engine() {
    [[ -n "$ENGINE" ]] && return 0
    if [[ "${1:-}" == plan ]]; then
        if [[ "${PCAM_ENGINE:-}" == docker || "${PCAM_ENGINE:-}" == podman ]]; then
            ENGINE="$PCAM_ENGINE"
            return 0
        elif [[ -z "${PCAM_ENGINE:-}" ]] && ! command -v docker >/dev/null 2>&1 && ! command -v podman >/dev/null 2>&1; then
            ENGINE=podman
            return 0
        fi
    fi
    if [[ -n "${PCAM_ENGINE:-}" ]]; then
        case "$PCAM_ENGINE" in
            docker | podman) ;;
            *) die "PCAM_ENGINE='$PCAM_ENGINE' is not supported: use docker or podman" ;;
        esac
        command -v "$PCAM_ENGINE" >/dev/null 2>&1 ||
            die "PCAM_ENGINE=$PCAM_ENGINE but '$PCAM_ENGINE' is not on PATH: install it or unset PCAM_ENGINE"
        ENGINE="$PCAM_ENGINE"
        return 0
    fi
    # A docker CLI without a reachable daemon is common (CI images, this kind of VM): skip it.
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    elif command -v docker >/dev/null 2>&1; then
        die "found the docker CLI but no running Docker daemon ('docker info' fails), and podman is not installed: start the Docker daemon, or install podman (Debian/Ubuntu as root: containers/build.sh install-podman)"
    else
        die "neither docker nor podman is installed: install Docker (https://docs.docker.com/engine/install/) or podman (Debian/Ubuntu as root: containers/build.sh install-podman)"
    fi
}

# engine ARGS...: the picked engine (pick_engine first).
engine() {
    if [[ "$ENGINE" == podman ]]; then
        podman "$@"
    else
        docker "$@"
    fi
}

project_version() {
    sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1
}
