#!/usr/bin/env bash
# The browser the web page of `pcam serve` is tested in (tests/integration/test_page.py).
#   scripts/browser.sh install   apt-get install Debian's chromium + chromium-driver (root; idempotent)
#   scripts/browser.sh check     print both versions; exit 1 if either is missing
# The test drives /usr/bin/chromium headless through /usr/bin/chromedriver (selenium, in .venv).
# Debian keeps the two packages at the same version, as chromedriver requires.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
BINARIES=(/usr/bin/chromium /usr/bin/chromedriver)

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # die, log, apt_install

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

installed() {
    local b
    for b in "${BINARIES[@]}"; do [[ -x $b ]] || return 1; done
}

versions() {
    # Debian's launcher script warns on stderr about unrelated shell tests; keep the first line.
    "${BINARIES[0]}" --version 2>/dev/null | head -n 1
    "${BINARIES[1]}" --version 2>/dev/null | head -n 1
}

cmd_install() {
    if installed; then
        log "already installed: $(versions | paste -sd ';' | sed 's/;/; /')."
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install runs apt-get: run it as root (or: sudo apt-get install --no-install-recommends ${PACKAGES[*]})."
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Chromium and its matching chromedriver (${BINARIES[*]}) with your package manager."
    log "installing ${PACKAGES[*]}..."
    apt_install "${PACKAGES[@]}"
    installed || die "packages installed but ${BINARIES[*]} are not all present."
    log "installed: $(versions | paste -sd ';' | sed 's/;/; /')."
}

cmd_check() {
    installed || die "${BINARIES[*]} not all present: run '$0 install' as root."
    versions
}

case "${1:-}" in
    install) cmd_install ;;
    check) cmd_check ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
