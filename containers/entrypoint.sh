#!/bin/sh
# pcam-entrypoint: the runtime environment for `docker run` / `podman run` of the pcam-pipeline
# image. (Apptainer does not run image entrypoints for `apptainer exec`; containers/apptainer.def
# sets the same things in %environment.) Works for any uid, with a read-only root file system.
set -eu

uid="$(id -u)"
scratch="${TMPDIR:-/tmp}"

# matplotlib, git and pip need a writable HOME. An arbitrary `--user UID` gets HOME=/ from docker
# (not writable) and HOME=<workdir> from podman (its made-up passwd entry): that would litter the
# bound checkout with .cache/ and .config/. Both get a HOME in scratch instead.
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ] || [ "${HOME}" = "$(pwd)" ]; then
    HOME="$scratch/pcam-home-$uid"
    mkdir -p "$HOME"
    export HOME
fi

# DVC keeps its per-repository site cache (locks, index) in /var/tmp/dvc by default, which may be
# read-only or belong to another user: put it in writable scratch, one per uid.
DVC_SITE_CACHE_DIR="${DVC_SITE_CACHE_DIR:-$scratch/pcam-dvc-site-cache-$uid}"
export DVC_SITE_CACHE_DIR

# Run the code of the bound checkout, not the copy installed in the image, so that what runs is
# what dvc.lock hashes (src/ is a dependency of the stages). PCAM_USE_IMAGE_SRC=1 turns this off.
if [ -z "${PCAM_USE_IMAGE_SRC:-}" ]; then
    dir="$(pwd)"
    while :; do
        if [ -f "$dir/src/pcam_pipeline/__init__.py" ] && [ -f "$dir/pyproject.toml" ]; then
            PYTHONPATH="$dir/src${PYTHONPATH:+:$PYTHONPATH}"
            export PYTHONPATH
            break
        fi
        [ "$dir" != / ] || break
        dir="$(dirname "$dir")"
    done
fi

exec "$@"
