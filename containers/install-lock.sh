#!/usr/bin/env bash
# containers/install-lock.sh PYTHON LOCK... - install exactly the pins of the LOCK files into
# PYTHON's environment, each file checked against the sha256 the lock names (--require-hashes,
# --no-deps): a file the lock does not name, a wheel swapped on an index or a mirror, or a pin
# without a hash is refused, and this says which package and the fix. `make setup` runs it (so do
# CI through `make test` and the Slurm venv route through `make setup`); the Dockerfile runs the
# same pip options. The first LOCK wins where two pin the same package (the cu130 lock's torch===,
# before requirements.lock's runtime pins).
#   PCAM_INSTALLER     uv | pip [uv when the environment has uv or a LOCK pins it, else pip].
#                      uv (installed first, by pip, from its hashed pin) is ~9x faster here
#                      (docs/development.md) but reads PyPI only, not pip.conf; pip uses this
#                      machine's pip configuration (its local mirrors and wheel folder).
#   PCAM_INSTALL_OPTIONS more installer options, split on spaces (the tests point it at their index)
set -euo pipefail
python=${1:?usage: containers/install-lock.sh PYTHON LOCK...}
shift
(($#)) || { echo "usage: containers/install-lock.sh PYTHON LOCK..." >&2; exit 2; }
args=()
for lock in "$@"; do args+=(--requirement "$lock"); done
log=$(mktemp "${TMPDIR:-/tmp}/pcam-install-lock.XXXXXX")
trap 'rm -f "$log" "$log.uv"' EXIT

uv="$(dirname "$python")/uv"
installer=${PCAM_INSTALLER:-}
if [[ -z $installer ]]; then
    installer=pip
    if [[ -x $uv ]] || grep -q -E '^uv==' "$@"; then installer=uv; fi
fi
status=0
case $installer in
    uv)
        if [[ ! -x $uv ]]; then
            # uv itself, by pip, checked against its own pin's sha256
            awk '/^[^ #-]/ { keep = $0 ~ /^uv==/ } keep' "$@" >"$log.uv"
            "$python" -m pip install --quiet --require-hashes --no-deps --requirement "$log.uv" \
                2>"$log" || status=$?
        fi
        if ((status == 0)); then
            # shellcheck disable=SC2086  # PCAM_INSTALL_OPTIONS is a list of options
            "$uv" pip install --quiet --python "$python" --require-hashes --no-deps \
                ${PCAM_INSTALL_OPTIONS:-} "${args[@]}" 2>"$log" || status=$?
        fi
        ;;
    pip)
        # shellcheck disable=SC2086  # PCAM_INSTALL_OPTIONS is a list of options
        "$python" -m pip install --quiet --require-hashes --no-deps ${PCAM_INSTALL_OPTIONS:-} \
            "${args[@]}" 2>"$log" || status=$?
        ;;
    *) echo "install-lock.sh: PCAM_INSTALLER=$installer: use uv or pip" >&2; exit 2 ;;
esac
cat "$log" >&2
if ((status != 0)) && grep -q -i -E 'hash' "$log"; then
    # pip: "    NAME==VERSION from URL:" (or "NAME==VERSION --hash=..."); uv: "Hash mismatch for
    # `NAME==VERSION`", "none were provided for: NAME==VERSION"
    # shellcheck disable=SC2016  # the backquotes are uv's, matched literally
    names=$(sed -n -E -e 's/^ {4}([A-Za-z0-9._-]+)={2,3}([^ ]+) (from|--hash).*/\1==\2/p' \
        -e 's/.*Hash mismatch for `([^`]+)`.*/\1/p' \
        -e 's/.*were provided for: (.*)$/\1/p' "$log" | tr ',' '\n' | tr -d ' ' | sort -u |
        paste -sd' ' -)
    cat >&2 <<EOF

install-lock.sh: refused ${names:-a file}: the file $installer got is not one that $* names (sha256).
  If pyproject.toml or a pin changed, the lock is out of date: run \`make lock\` and commit the locks.
  If not, the index, mirror or wheel folder served other bytes than the lock names: do not install
  them; find out where they came from (docs/development.md, 'Updating dependencies').
EOF
fi
exit "$status"
