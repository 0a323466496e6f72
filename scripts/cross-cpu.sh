#!/usr/bin/env bash
# Run a command on an emulated CPU, to check that a result is the same on another CPU model.
#   scripts/cross-cpu.sh install             apt-get install Debian's qemu-user (root; idempotent)
#   scripts/cross-cpu.sh models              the CPU models the test suite checks, one per line
#   scripts/cross-cpu.sh run MODEL CMD...    CMD under qemu-x86_64 -cpu MODEL (`qemu-x86_64 -cpu help`)
# e.g. scripts/cross-cpu.sh run EPYC-Rome .venv/bin/python -m pcam_pipeline.cli train
# qemu's TCG emulates AVX2 and FMA, not AVX-512, at about 1/1000 of the speed: a few steps on a
# small batch (tests/integration/test_cross_cpu.py; docs/reproducibility.md).
set -euo pipefail

# An Intel and an AMD AVX2 CPU: the two vendors' MKL paths, neither with AVX-512.
MODELS=(Haswell-v4 EPYC-Rome)
QEMU=qemu-x86_64

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd_install() {
    if command -v "$QEMU" >/dev/null 2>&1; then
        log "$("$QEMU" --version | head -n 1) is installed."
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install runs apt-get: run it as root (or: sudo apt-get install qemu-user)."
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install qemu-user (qemu-x86_64) with your package manager."
    log "installing qemu-user..."
    apt_install qemu-user
    command -v "$QEMU" >/dev/null 2>&1 || die "qemu-user installed but $QEMU is not on PATH."
    log "installed $("$QEMU" --version | head -n 1)."
}

cmd_run() {
    [[ $# -ge 2 ]] || usage
    local model=$1
    shift
    command -v "$QEMU" >/dev/null 2>&1 || die "$QEMU not found: run '$0 install' first."
    local known
    known="$("$QEMU" -cpu help || true)" # it lists the models, then exits with status 1
    grep -qE "^x86 +$model( |$)" < <(printf '%s\n' "$known") ||
        die "unknown CPU model '$model'; '$QEMU -cpu help' lists them (e.g. ${MODELS[*]})."
    # qemu warns once per feature its TCG cannot emulate (AVX-512 and the like): harmless here.
    exec "$QEMU" -cpu "$model" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
}

case "${1:-}" in
    install) cmd_install ;;
    models) printf '%s\n' "${MODELS[@]}" ;;
    run)
        shift
        cmd_run "$@"
        ;;
    *) usage ;;
esac
