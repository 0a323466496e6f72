# shellcheck shell=bash
# What the scripts/*.sh commands share: their help, their errors, and which Python and dvc they
# use. Sourced (never executed): `source "$(dirname "${BASH_SOURCE[0]}")/common.sh"`.

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project_root="$(dirname "$scripts_dir")"

usage() {
    # The comment block at the top of the command's file, without the '# '.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 1
}

log() { echo "$(basename "$0"): $*" >&2; }

# The interpreter: $PCAM_PYTHON, else the project's .venv, else python3 on PATH (or nothing).
project_python() {
    if [[ -n "${PCAM_PYTHON:-}" ]]; then
        echo "$PCAM_PYTHON"
    elif [[ -x "$project_root/.venv/bin/python" ]]; then
        echo "$project_root/.venv/bin/python"
    else
        command -v python3 || true
    fi
}

# dvc: the one beside that interpreter, else the one on PATH (or nothing).
project_dvc() {
    local beside
    beside="$(dirname "$(project_python)")/dvc"
    if [[ -x "$beside" ]]; then
        echo "$beside"
    else
        command -v dvc || true
    fi
}

# apt_install PACKAGE...: Debian's packages (as root), running `apt-get update` once if the
# install fails (a machine whose package lists are stale or were never fetched).
apt_install() {
    if ! apt_get install -y --no-install-recommends "$@"; then
        log "install failed; running apt-get update once and retrying..."
        apt_get update
        apt_get install -y --no-install-recommends "$@"
    fi
}

apt_get() {
    # apt may be locked by another install on a shared machine: retry for up to ~2 minutes.
    local try err
    err="$(mktemp)"
    for try in $(seq 1 40); do
        if DEBIAN_FRONTEND=noninteractive apt-get "$@" 2>"$err"; then
            rm -f "$err"
            return 0
        fi
        if grep -qiE 'could not get lock|unable to acquire the dpkg|is another process using it' "$err"; then
            [[ $try -eq 1 ]] && log "apt is locked by another process; retrying..."
            sleep 3
            continue
        fi
        cat "$err" >&2
        rm -f "$err"
        return 1
    done
    cat "$err" >&2
    rm -f "$err"
    die "apt stayed locked for 2 minutes; retry when the other apt-get/dpkg run has finished."
}
