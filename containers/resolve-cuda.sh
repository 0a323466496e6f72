#!/usr/bin/env bash
# containers/resolve-cuda.sh VARIANT - write requirements-VARIANT.lock (make lock-VARIANT): the runtime
# lock (requirements-runtime.lock) with torch's CUDA build and the NVIDIA wheels it pulls, resolved by
# pip against the index that serves that build, in a throwaway venv:
#   cu13x  PyPI (its Linux torch wheel is the CUDA 13.0 build)
#   cu12x  https://download.pytorch.org/whl/VARIANT, PyPI for the rest
# This machine's pip configuration is left out on purpose (PIP_CONFIG_FILE=/dev/null, no PIP_*
# index or find-links variables): a wheel folder holding the CPU torch (2.13.0+cpu sorts above 2.13.0)
# would win. Only the CA bundle it names is kept. Needs network access to the index (not the GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
variant=${1:?usage: containers/resolve-cuda.sh cuXXX}
[[ $variant == cu[0-9]* ]] || { echo "resolve-cuda.sh: not a CUDA variant: $variant" >&2; exit 2; }
python=${PYTHON:-.venv/bin/python}
min_driver=$(TORCH_VARIANT=$variant containers/build.sh print-min-driver)
cert=$("$python" -m pip config get global.cert 2>/dev/null || true)
cert=${PIP_CERT:-$cert}
work=$(mktemp -d "${TMPDIR:-/tmp}/pcam-resolve-$variant.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
grep -v -E '^(#|torch==)' requirements-runtime.lock >"$work/constraints.txt"
"$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$work/roots.txt"
case $variant in
    cu13*) index=(--index-url https://pypi.org/simple) ;;
    *) index=(--index-url "https://download.pytorch.org/whl/$variant" --extra-index-url https://pypi.org/simple) ;;
esac
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
    PIP_CONFIG_FILE=/dev/null ${cert:+PIP_CERT=$cert} \
    "$work/venv/bin/pip" install --quiet --dry-run --ignore-installed --report "$work/report.json" \
    "${index[@]}" --constraint "$work/constraints.txt" --requirement "$work/roots.txt"
"$python" containers/lock.py cuda-lock "$work/report.json" "requirements-$variant.lock" "$variant" "$min_driver"
"$python" containers/lock.py check-cuda "requirements-$variant.lock"
