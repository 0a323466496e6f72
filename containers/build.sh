#!/usr/bin/env bash
# containers/build.sh - build the pcam-pipeline container image and the Apptainer SIF made from it.
#
#   containers/build.sh image            build containers/Dockerfile with docker or podman
#   containers/build.sh plan             print what `image` would run (variant, lock, build command)
#   containers/build.sh save             write the image to build/pcam-pipeline.tar (docker-archive)
#   containers/build.sh sif              save + `apptainer build pcam.sif containers/apptainer.def`
#   containers/build.sh base             make a local Debian bookworm base image (debootstrap)
#   containers/build.sh install-podman   apt-get podman, buildah and what they need (Debian, root)
#   containers/build.sh print-image      print the image name `image` builds
#   containers/build.sh print-archive    print the archive path `save` writes
#   containers/build.sh print-min-driver the oldest NVIDIA driver $TORCH_VARIANT runs on
#
# Settings (environment variables; defaults in brackets):
#   PCAM_ENGINE          docker | podman [the first one that works: docker with a reachable daemon,
#                        else podman]
#   PCAM_IMAGE           image name [pcam-pipeline:$TORCH_VARIANT]
#   BASE_IMAGE           base image [docker.io/library/python:3.11-slim-bookworm]; any Debian
#                        bookworm image with or without Python 3.11 works (`base` makes one)
#   TORCH_VARIANT        cpu | cu130 | cu126 | ... | serve [cpu]: the torch build; each installs
#                        exactly one lock file: cpu requirements-runtime.lock, cuXXX
#                        requirements-cuXXX.lock (cu130: PyPI's torch wheel, CUDA 13.0, NVIDIA
#                        driver >= 580; other cuXXX: make the lock first with `make lock-cuXXX`, see
#                        docs/containers.md). serve: the serving image instead (the Dockerfile's
#                        `serve` target: requirements-serve.lock, no torch, no DVC, `pcam serve` of
#                        the exported model baked in; docs/containers.md, 'The serving image')
#   PCAM_EXPORT_DIR      serve: the exported model baked into the image [models/export]
#   PCAM_MODEL_COMMIT    serve: the commit `pcam serve` reports [HEAD of the repository holding
#                        PCAM_EXPORT_DIR, `-dirty` if its dvc.lock, params.yaml or src/ changed]
#   TORCH_INDEX_URL      auto | pypi | none | URL [cpu and cu12x: auto =
#                        https://download.pytorch.org/whl/$TORCH_VARIANT; cu130: pypi = PyPI;
#                        none = take torch from the pip configuration like any other package]
#   PCAM_PLATFORM        the image platform [linux/amd64: the locks pin x86_64 wheels]
#   PCAM_PIP_FROM_HOST   auto | 1 | 0 [auto]: podman only. Bind this machine's pip configuration
#                        (CA bundle, find-links wheel folders, file:// indexes) into the build's
#                        RUN steps; nothing of it ends up in the image. auto = when the host pip
#                        configuration names any of them. cpu: sets TORCH_INDEX_URL=none unless
#                        given (the CPU torch wheel from the wheel folder); CUDA variants leave the
#                        wheel folders out (a local +cpu wheel would outrank PyPI's CUDA build).
#   PCAM_ARCHIVE         docker-archive path [build/pcam-pipeline.tar] (apptainer.def names it;
#                        serve: build/pcam-pipeline-serve.tar)
#   PCAM_SIF             SIF path [pcam.sif; serve: pcam-serve.sif]
#   PCAM_BUILD_ARGS      extra arguments for `docker/podman build` (word-split)
#   DEBIAN_MIRROR        mirror for `base` [the first bookworm mirror in /etc/apt/sources.list*]
#   PCAM_BASE_IMAGE_NAME name `base` gives its image [localhost/debian:bookworm]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=containers/lib.sh
source containers/lib.sh

TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
PCAM_PLATFORM="${PCAM_PLATFORM:-linux/amd64}"
PCAM_IMAGE="${PCAM_IMAGE:-pcam-pipeline:${TORCH_VARIANT}}"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"
if [[ "$TORCH_VARIANT" == serve ]]; then
    PCAM_ARCHIVE="${PCAM_ARCHIVE:-build/pcam-pipeline-serve.tar}"
    PCAM_SIF="${PCAM_SIF:-pcam-serve.sif}"
else
    PCAM_ARCHIVE="${PCAM_ARCHIVE:-build/pcam-pipeline.tar}"
    PCAM_SIF="${PCAM_SIF:-pcam.sif}"
fi
PCAM_EXPORT_DIR="${PCAM_EXPORT_DIR:-models/export}"
PCAM_BASE_IMAGE_NAME="${PCAM_BASE_IMAGE_NAME:-localhost/debian:bookworm}"
# podman on hosts like CI (hybrid cgroups): crun fails there, runc works; chroot isolation needs no
# nested namespaces. Both are harmless elsewhere.
PODMAN_BUILD_OPTS=(--isolation chroot)
PODMAN_RUNTIME_OPTS=()
if command -v runc >/dev/null 2>&1; then PODMAN_RUNTIME_OPTS=(--runtime runc); fi

# --- torch variants: which lock, where torch comes from, the oldest NVIDIA driver -----------------
# variant_lock / variant_index / variant_min_driver VARIANT
variant_lock() {
    case "$1" in
        cpu) echo requirements-runtime.lock ;;
        cu[0-9]*) echo "requirements-$1.lock" ;;
        serve) echo requirements-serve.lock ;;
        *) die "TORCH_VARIANT='$1' is not supported: use cpu, cu130 or another cuXXX with a lock file, or serve (docs/containers.md)" ;;
    esac
}
variant_index() {
    case "$1" in
        cu13*) echo pypi ;; # PyPI's Linux torch wheel is the CUDA 13.0 build
        *) echo auto ;;     # download.pytorch.org/whl/$1
    esac
}
# The oldest driver the variant's CUDA major runs on (containers/cuda-min-driver.txt: cu13* ->
# the row of 13): what the Slurm wrappers check on the node before training.
variant_min_driver() {
    local driver=""
    case "$1" in
        cpu | serve) ;;
        cu[0-9]*)
            driver="$(awk -v variant="$1" '!/^#/ && NF == 2 && index(variant, "cu" $1) == 1 { print $2; exit }' \
                containers/cuda-min-driver.txt)"
            ;;
    esac
    [[ -n "$driver" || "$1" == cpu || "$1" == serve ]] ||
        die "no minimum NVIDIA driver known for TORCH_VARIANT=$1 (containers/cuda-min-driver.txt)"
    echo "$driver"
}

# --- pip settings of this machine, bound into the build (podman) ------------------------------
# Prints lines `cert PATH`, `links DIR`, `index URL` from `pip config list` (all scopes and PIP_*).
host_pip_settings() {
    local py
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || return 0
    "$py" -m pip config list 2>/dev/null | "$py" -c '
import shlex, sys
seen = set()
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    if not value:
        continue
    name = key.rsplit(".", 1)[-1]
    values = shlex.split(value)
    values = [w for v in values for w in v.split()]
    for v in values:
        if name == "cert":
            item = ("cert", v)
        elif name == "find-links":
            item = ("links", v)
        elif name in ("index-url", "extra-index-url"):
            item = ("index", v)
        else:
            continue
        if item not in seen:
            seen.add(item)
            print(*item)
'
}

# Fills $PIP_DIR (a new host folder, bound at /run/pcam-build during the build) with pip.conf, a
# copy of the CA bundle and empty mount points for the wheel folders and local indexes, which are
# bound inside it: so the image keeps no trace of them but an empty /run/pcam-build.
# Sets PIP_VOLUMES (podman --volume options). Returns 1 if the host pip configuration names none.
PIP_VOLUMES=()
PIP_DIR=""
prepare_host_pip() {
    local kind value n_links=0 n_index=0 links=() indexes=() cert=""
    PIP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pcam-build-pip.XXXXXX")"
    chmod 755 "$PIP_DIR"
    while read -r kind value; do
        case "$kind" in
            cert)
                [[ -z "$cert" && -f "$value" ]] || continue
                cp "$value" "$PIP_DIR/ca.crt"
                cert=/run/pcam-build/ca.crt
                ;;
            links)
                if [[ "$TORCH_VARIANT" != cpu && "$TORCH_VARIANT" != serve ]]; then
                    note "leaving the wheel folder $value out of the $TORCH_VARIANT build (a local +cpu torch would outrank PyPI's CUDA build)"
                    continue
                fi
                value="${value#file://}"
                if [[ -d "$value" ]]; then
                    mkdir "$PIP_DIR/links$n_links"
                    PIP_VOLUMES+=(--volume "$value:/run/pcam-build/links$n_links:ro")
                    links+=("/run/pcam-build/links$n_links")
                    n_links=$((n_links + 1))
                elif [[ "$value" == http* ]]; then
                    links+=("$value")
                fi
                ;;
            index)
                if [[ "$value" == file://* ]]; then
                    value="${value#file://}"
                    value="${value%/}"
                    [[ -d "$value" ]] || continue
                    # Bind the folder above: local indexes link to ../../files/*.whl.
                    mkdir "$PIP_DIR/index$n_index"
                    PIP_VOLUMES+=(--volume "$(dirname "$value"):/run/pcam-build/index$n_index:ro")
                    indexes+=("file:///run/pcam-build/index$n_index/$(basename "$value")")
                    n_index=$((n_index + 1))
                else
                    indexes+=("$value")
                fi
                ;;
        esac
    done < <(host_pip_settings)
    if [[ -z "$cert" && ${#links[@]} -eq 0 && ${#indexes[@]} -eq 0 ]]; then
        rm -rf "$PIP_DIR"
        PIP_DIR=""
        return 1
    fi
    # The default index (PyPI) stays first; the host's extra indexes and wheel folders come on top.
    local extra=()
    for value in "${indexes[@]}"; do
        [[ "$value" == "https://pypi.org/simple" || "$value" == "https://pypi.org/simple/" ]] ||
            extra+=("$value")
    done
    {
        echo "[global]"
        [[ -z "$cert" ]] || echo "cert = $cert"
        ((${#links[@]} == 0)) || echo "find-links = ${links[*]}"
        ((${#extra[@]} == 0)) || echo "extra-index-url = ${extra[*]}"
    } >"$PIP_DIR/pip.conf"
    chmod -R a+rX "$PIP_DIR"
    # The folder itself first: podman mounts in the order given.
    PIP_VOLUMES=(--volume "$PIP_DIR:/run/pcam-build:ro" "${PIP_VOLUMES[@]}")
    return 0
}

git_commit() {
    local rev
    rev="$(git -C "$REPO_ROOT" rev-parse --verify --quiet HEAD 2>/dev/null || true)"
    [[ -n "$rev" ]] || rev=unknown
    if [[ "$rev" != unknown ]] && [[ -n "$(git -C "$REPO_ROOT" status --porcelain -- src pyproject.toml requirements.lock containers 2>/dev/null)" ]]; then
        rev="$rev-dirty"
    fi
    echo "$rev"
}

# The commit the serving image's model was made at (`pcam serve` reports it): the HEAD of the
# repository holding PCAM_EXPORT_DIR, `-dirty` if what the export depends on changed there. Empty
# when unknown (no git repository).
model_commit() {
    if [[ -n "${PCAM_MODEL_COMMIT:-}" ]]; then
        echo "$PCAM_MODEL_COMMIT"
        return 0
    fi
    local top rev
    top="$(git -C "$PCAM_EXPORT_DIR" rev-parse --show-toplevel 2>/dev/null || true)"
    [[ -n "$top" ]] || return 0
    rev="$(git -C "$top" rev-parse --verify --quiet HEAD 2>/dev/null || true)"
    [[ -n "$rev" ]] || return 0
    if [[ -n "$(git -C "$top" status --porcelain -- dvc.lock params.yaml src 2>/dev/null)" ]]; then
        rev="$rev-dirty"
    fi
    echo "$rev"
}

# --- subcommands -------------------------------------------------------------------------------
# build_args: fills BUILD_ARGS (everything after `docker/podman`), BUILD_TMP and SERVE_CONTEXT
# (folders to remove afterwards: cleanup_build) and prints the plan on stderr. Needs ENGINE.
BUILD_ARGS=()
BUILD_TMP=""
SERVE_CONTEXT=""
cleanup_build() {
    [[ -z "$BUILD_TMP" ]] || rm -rf "$BUILD_TMP"
    [[ -z "$SERVE_CONTEXT" ]] || rm -rf "$SERVE_CONTEXT"
}

# podman only: bind this machine's pip settings into the build's RUN steps (prepare_host_pip).
# Returns 1 when nothing was bound.
bind_host_pip() {
    local from_host="${PCAM_PIP_FROM_HOST:-auto}"
    if [[ "$from_host" != 0 ]] && prepare_host_pip; then
        BUILD_TMP="$PIP_DIR"
        BUILD_ARGS+=("${PIP_VOLUMES[@]}" --build-arg PIP_CONFIG_FILE=/run/pcam-build/pip.conf)
        note "binding this machine's pip settings into the build (not into the image):"
        sed 's/^/    /' "$BUILD_TMP/pip.conf" >&2
        return 0
    elif [[ "$from_host" == 1 ]]; then
        die "PCAM_PIP_FROM_HOST=1 but 'python3 -m pip config list' names no cert, find-links or index"
    fi
    return 1
}

# The serving image (TORCH_VARIANT=serve): the Dockerfile's `serve` target, built from a context
# of its own holding exactly what it copies (the repository root's .dockerignore keeps models/ and
# params.yaml out of the training image's context).
serve_build_args() {
    local lock=requirements-serve.lock export_dir="$PCAM_EXPORT_DIR" commit model_md5 file
    [[ -f "$lock" ]] || die "$lock is missing in $REPO_ROOT (see docs/development.md, 'Updating dependencies')"
    for file in model.onnx model_card.json; do
        [[ -f "$export_dir/$file" ]] ||
            die "$export_dir/$file not found: the serving image bakes in the exported model; run 'dvc repro export' (or 'dvc pull models/export'), or point PCAM_EXPORT_DIR at an export directory"
    done
    commit="$(model_commit)"
    model_md5="$(md5sum "$export_dir/model.onnx" | cut -d' ' -f1)"
    SERVE_CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/pcam-serve-context.XXXXXX")"
    tar -C "$REPO_ROOT" --exclude=__pycache__ --exclude='*.py[co]' --exclude='*.egg-info' \
        -cf - "$lock" pyproject.toml README.md params.yaml src | tar -C "$SERVE_CONTEXT" -xf -
    mkdir "$SERVE_CONTEXT/models"
    cp -RL "$export_dir" "$SERVE_CONTEXT/models/export"
    chmod -R a+rX "$SERVE_CONTEXT"
    BUILD_ARGS=(build --file "$REPO_ROOT/containers/Dockerfile" --target serve --tag "$PCAM_IMAGE"
        --platform "$PCAM_PLATFORM"
        --build-arg "BASE_IMAGE=$BASE_IMAGE"
        --build-arg "PCAM_LOCK=$lock"
        --build-arg "PCAM_MODEL_COMMIT=$commit"
        --label "org.opencontainers.image.version=$(project_version)"
        --label "org.opencontainers.image.revision=$(git_commit)"
        --label "org.opencontainers.image.base.name=$BASE_IMAGE"
        --label "io.github.pcam-pipeline.torch-variant=serve"
        --label "io.github.pcam-pipeline.lock=$lock"
        --label "io.github.pcam-pipeline.lock-sha256=$(sha256sum "$lock" | cut -d' ' -f1)"
        --label "io.github.pcam-pipeline.model-md5=$model_md5"
        --label "io.github.pcam-pipeline.model-commit=$commit")
    if [[ -n "${GITHUB_REPOSITORY:-}" ]]; then
        BUILD_ARGS+=(--label "org.opencontainers.image.source=${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY")
    fi
    if [[ "$ENGINE" == podman ]]; then
        # The docker format keeps HEALTHCHECK (podman's default OCI format drops it).
        BUILD_ARGS+=("${PODMAN_BUILD_OPTS[@]}" --format docker)
        bind_host_pip || true
    elif [[ "${PCAM_PIP_FROM_HOST:-auto}" == 1 ]]; then
        die "PCAM_PIP_FROM_HOST=1 needs podman (docker build cannot bind host folders): set PCAM_ENGINE=podman"
    fi
    # shellcheck disable=SC2206  # intentional word splitting of user-supplied extra arguments
    local extra=(${PCAM_BUILD_ARGS:-})
    BUILD_ARGS+=("${extra[@]}" "$SERVE_CONTEXT")
    note "serving image: lock $lock, model $export_dir/model.onnx (md5 $model_md5, commit ${commit:-unknown}), platform $PCAM_PLATFORM"
}

build_args() {
    if [[ "$TORCH_VARIANT" == serve ]]; then
        serve_build_args
        return 0
    fi
    local lock min_driver torch_index
    lock="$(variant_lock "$TORCH_VARIANT")"
    [[ -f "$lock" ]] || die "$lock is missing in $REPO_ROOT: TORCH_VARIANT=$TORCH_VARIANT installs exactly these pins (make it with 'make lock-$TORCH_VARIANT'; see docs/development.md, 'Updating dependencies')"
    min_driver="$(variant_min_driver "$TORCH_VARIANT")"
    torch_index="${TORCH_INDEX_URL:-}"
    BUILD_ARGS=(build --file containers/Dockerfile --tag "$PCAM_IMAGE"
        --platform "$PCAM_PLATFORM"
        --build-arg "BASE_IMAGE=$BASE_IMAGE"
        --build-arg "TORCH_VARIANT=$TORCH_VARIANT"
        --build-arg "PCAM_LOCK=$lock"
        --build-arg "CUDA_MIN_DRIVER=$min_driver"
        --label "org.opencontainers.image.version=$(project_version)"
        --label "org.opencontainers.image.revision=$(git_commit)"
        --label "org.opencontainers.image.base.name=$BASE_IMAGE"
        --label "io.github.pcam-pipeline.torch-variant=$TORCH_VARIANT"
        --label "io.github.pcam-pipeline.lock=$lock"
        --label "io.github.pcam-pipeline.lock-sha256=$(sha256sum "$lock" | cut -d' ' -f1)"
        --label "io.github.pcam-pipeline.cuda-min-driver=$min_driver")
    if [[ -n "${GITHUB_REPOSITORY:-}" ]]; then
        BUILD_ARGS+=(--label "org.opencontainers.image.source=${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY")
    fi
    if [[ "$ENGINE" == podman ]]; then
        BUILD_ARGS+=("${PODMAN_BUILD_OPTS[@]}")
        if bind_host_pip && [[ "$TORCH_VARIANT" == cpu ]]; then
            torch_index="${torch_index:-none}"
        fi
    elif [[ "${PCAM_PIP_FROM_HOST:-auto}" == 1 ]]; then
        die "PCAM_PIP_FROM_HOST=1 needs podman (docker build cannot bind host folders): set PCAM_ENGINE=podman"
    fi
    torch_index="${torch_index:-$(variant_index "$TORCH_VARIANT")}"
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$torch_index")
    # shellcheck disable=SC2206  # intentional word splitting of user-supplied extra arguments
    local extra=(${PCAM_BUILD_ARGS:-})
    BUILD_ARGS+=("${extra[@]}" .)
    note "variant $TORCH_VARIANT: lock $lock, torch index $torch_index, platform $PCAM_PLATFORM, NVIDIA driver >= ${min_driver:-none (CPU)}"
}

cmd_plan() {
    pick_engine plan # the one `image` would use; none need be installed
    build_args
    cleanup_build
    printf '%q ' "$ENGINE" "${BUILD_ARGS[@]}"
    echo
}

cmd_image() {
    pick_engine
    build_args
    note "$ENGINE ${BUILD_ARGS[*]}"
    local start=$SECONDS rc=0
    engine "${BUILD_ARGS[@]}" || rc=$?
    cleanup_build
    ((rc == 0)) || die "$ENGINE build failed (exit $rc); see the output above"
    local size
    size="$(engine image inspect --format '{{.Size}}' "$PCAM_IMAGE" 2>/dev/null || echo '?')"
    note "built $PCAM_IMAGE in $((SECONDS - start)) s; size $size bytes"
}

cmd_print_image() {
    echo "$PCAM_IMAGE"
}

cmd_print_archive() {
    echo "$PCAM_ARCHIVE"
}

cmd_save() {
    pick_engine
    engine image inspect "$PCAM_IMAGE" >/dev/null 2>&1 ||
        die "image $PCAM_IMAGE not found in $ENGINE: build it first (make image / containers/build.sh image)"
    mkdir -p "$(dirname "$PCAM_ARCHIVE")"
    rm -f "$PCAM_ARCHIVE"
    if [[ "$ENGINE" == podman ]]; then
        podman save --format docker-archive --output "$PCAM_ARCHIVE" "$PCAM_IMAGE"
    else
        docker save --output "$PCAM_ARCHIVE" "$PCAM_IMAGE"
    fi
    note "saved $PCAM_IMAGE to $PCAM_ARCHIVE ($(du -h "$PCAM_ARCHIVE" | cut -f1))"
}

cmd_sif() {
    local apptainer
    apptainer="$(command -v apptainer || command -v singularity || true)"
    [[ -n "$apptainer" ]] ||
        die "apptainer is not installed (nor singularity): install Apptainer (https://apptainer.org/docs/admin/main/installation.html), or copy $PCAM_ARCHIVE (containers/build.sh save) and containers/apptainer.def to a machine that has it (e.g. Snellius) and run 'containers/build.sh sif' there"
    if command -v docker >/dev/null 2>&1 || command -v podman >/dev/null 2>&1; then
        cmd_save
    elif [[ -f "$PCAM_ARCHIVE" ]]; then
        note "no docker/podman here: using the existing $PCAM_ARCHIVE"
    else
        die "no docker or podman to save the image, and $PCAM_ARCHIVE does not exist: make it where the image was built (containers/build.sh save) and copy it here"
    fi
    if [[ "$TORCH_VARIANT" == serve ]]; then
        # Straight from the archive: apptainer.def's %environment and %test are the training
        # environment's (DVC, git, torch). The image's ENV and CMD become the SIF's environment and
        # runscript (`apptainer run pcam-serve.sif` = pcam serve on 0.0.0.0:8080, token required).
        "$apptainer" build --force "$PCAM_SIF" "docker-archive://$PCAM_ARCHIVE"
        "$apptainer" exec --cleanenv "$PCAM_SIF" python -c 'import importlib.util, pathlib, sys; from pcam_pipeline.serve.model import load_model; m = load_model(pathlib.Path("/srv/pcam/models/export"), "fp32", "cpu", 1); sys.exit("torch is in the serving SIF" if importlib.util.find_spec("torch") else None); print("pcam-serve SIF self-test passed: model md5", m.identity["md5"], "commit", m.identity["commit"])'
        note "built $PCAM_SIF ($(du -h "$PCAM_SIF" | cut -f1))"
        return 0
    fi
    [[ "$PCAM_ARCHIVE" == build/pcam-pipeline.tar ]] ||
        die "containers/apptainer.def reads build/pcam-pipeline.tar; PCAM_ARCHIVE=$PCAM_ARCHIVE differs"
    # Apptainer unpacks the layers into APPTAINER_TMPDIR and caches blobs in APPTAINER_CACHEDIR
    # (default ~/.apptainer): several GB, so keep them off a small home file system.
    note "APPTAINER_TMPDIR=${APPTAINER_TMPDIR:-<unset: /tmp>} APPTAINER_CACHEDIR=${APPTAINER_CACHEDIR:-<unset: ~/.apptainer/cache>}"
    "$apptainer" build --force "$PCAM_SIF" containers/apptainer.def
    "$apptainer" test "$PCAM_SIF"
    note "built $PCAM_SIF ($(du -h "$PCAM_SIF" | cut -f1))"
}

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return 0
    fi
    local f mirror=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        mirror="$(awk '
            # one-line format: deb [opts] URI SUITE COMPONENTS
            $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                          if ($(i + 1) == "bookworm") { print $i; exit } }
            # deb822 format: a stanza with URIs: and Suites: bookworm
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (j = 2; j <= NF; j++) if ($j == "bookworm") hit = 1 }
            /^[[:space:]]*$/ { if (hit && uri != "") { print uri; exit } hit = 0; uri = "" }
            END { if (hit && uri != "") print uri }
        ' "$f" | head -n 1)"
        [[ -z "$mirror" ]] || break
    done
    [[ -n "$mirror" ]] ||
        die "no Debian bookworm mirror found in /etc/apt/sources.list*: set DEBIAN_MIRROR (e.g. http://deb.debian.org/debian)"
    echo "$mirror"
}

cmd_base() {
    pick_engine
    command -v debootstrap >/dev/null 2>&1 ||
        die "debootstrap is not installed: apt-get install debootstrap (or containers/build.sh install-podman)"
    [[ $EUID -eq 0 ]] || die "'base' runs debootstrap, which needs root"
    local mirror rootfs start=$SECONDS
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/pcam-rootfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" EXIT
    note "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        die "debootstrap failed (log above): check the mirror $mirror (DEBIAN_MIRROR) and the network"
    }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -c . |
        engine import --change 'CMD ["/bin/bash"]' - "$PCAM_BASE_IMAGE_NAME" >/dev/null
    note "made $PCAM_BASE_IMAGE_NAME in $((SECONDS - start)) s; use it with BASE_IMAGE=$PCAM_BASE_IMAGE_NAME"
}

cmd_install_podman() {
    [[ $EUID -eq 0 ]] || die "install-podman runs apt-get: run it as root (or with sudo)"
    command -v apt-get >/dev/null 2>&1 ||
        die "install-podman knows only apt-get (Debian/Ubuntu): install podman with your package manager"
    local pkgs=(podman buildah debootstrap fuse-overlayfs slirp4netns uidmap runc)
    local try
    # Another apt-get may hold the lock for a while: retry.
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}"; then
            podman --version
            return 0
        fi
        if ((try == 1)); then apt-get update || true; fi
        note "apt-get install failed (try $try); retrying in 6 s"
        sleep 6
    done
    die "apt-get install ${pkgs[*]} failed 10 times: see the apt output above"
}

main() {
    local cmd="${1:-help}"
    case "$cmd" in
        image) cmd_image ;;
        plan) cmd_plan ;;
        print-min-driver) variant_min_driver "$TORCH_VARIANT" ;;
        save) cmd_save ;;
        sif) cmd_sif ;;
        base) cmd_base ;;
        install-podman) cmd_install_podman ;;
        print-image) cmd_print_image ;;
        print-archive) cmd_print_archive ;;
        help | -h | --help) usage ;;
        *)
            usage >&2
            die "unknown subcommand '$cmd'"
            ;;
    esac
}

main "$@"
