#!/usr/bin/env bash
# containers/publish.sh - what CI (.github/workflows/images.yml) does after `make test`, one step each,
# so that every step runs the same way on a laptop, here, and on the GitHub runner:
#
#   containers/publish.sh repro-check      dvc repro of the embedded default inside the image, in a
#                                          fresh clone of HEAD; fails if dvc.lock differs from HEAD's
#   containers/publish.sh push             tag the image by commit (and version on a v* tag) and
#                                          push it; prints and records the pushed digest
#   containers/publish.sh install-apptainer   Apptainer from its Ubuntu PPA (GitHub runner, root)
#   containers/publish.sh sif              apptainer build pcam.sif from the pushed image (the def
#                                          file with a `Bootstrap: docker` header), apptainer test
#   containers/publish.sh sif-push         apptainer push pcam.sif oras://<registry>/pcam-pipeline-sif
#   containers/publish.sh tags             print the tags `push` and `sif-push` would use
#   containers/publish.sh local-registry start|stop DIR PORT
#                                          a plain-HTTP registry on 127.0.0.1:PORT storing in DIR
#                                          (Debian's docker-registry, installed if missing): to try
#                                          `push` without GHCR (the tests do)
#   containers/publish.sh runner-disk      GitHub runner only: remove preinstalled toolchains the
#                                          CUDA image needs the room of; make /mnt/apptainer
#
# Settings (environment variables; defaults in brackets):
#   TORCH_VARIANT       cpu | cu130 | ... [cpu]; PCAM_IMAGE [pcam-pipeline:$TORCH_VARIANT]
#   PCAM_REGISTRY       where images go [ghcr.io/<GITHUB_REPOSITORY_OWNER, lower case>]
#   PCAM_COMMIT_SHA     the commit the tags name [$GITHUB_SHA, else git rev-parse HEAD]
#   PCAM_MODEL_RECORD   the registry.json of `pcam model-get` (the registry workflow): the serving
#                       image is tagged serve-model-<version> (and serve-model-<stage>) instead of
#                       by the release tag
#   PCAM_VERSION_TAG    the release tag [$GITHUB_REF_NAME when GITHUB_REF_TYPE=tag, else the tag
#                       pointing at HEAD, if any]; a vX.Y.Z tag must match pyproject's version
#   PCAM_ENGINE         docker | podman [docker when its daemon answers, else podman]
#                       (containers/lib.sh: the same choice and checks as containers/build.sh)
#   PCAM_TLS_VERIFY     0: push to a plain-HTTP registry (a local test registry) [1]
#   PCAM_REPRO_THREADS  CPU threads for repro-check [2: the committed dvc.lock is made on 2 cores,
#                       and CPU training is bit-reproducible only with the same thread count]
#   PCAM_SIF            [pcam.sif]; PCAM_IMAGE_REF: the image the SIF is built from [the digest
#                       reference `push` recorded in build/image-$TORCH_VARIANT.ref]
#   PCAM_BUILD_DIR      where `push` records the pushed reference [build]
#   PCAM_DRY_RUN=1      print the commands that change something (push, login, install, build)
#                       instead of running them
#   REGISTRY_USER / REGISTRY_TOKEN   for `sif` and `sif-push` (apptainer's own registry login)
set -euo pipefail
shopt -s inherit_errexit # a die() inside $(...) stops the script too

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=containers/lib.sh
source containers/lib.sh

TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
PCAM_IMAGE="${PCAM_IMAGE:-pcam-pipeline:${TORCH_VARIANT}}"
PCAM_SIF="${PCAM_SIF:-pcam.sif}"
NAME=pcam-pipeline

# do_run CMD...: run CMD, or with PCAM_DRY_RUN=1 print it (one line, shell-quoted) on stdout.
do_run() {
    if [[ "${PCAM_DRY_RUN:-0}" == 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

registry() {
    if [[ -n "${PCAM_REGISTRY:-}" ]]; then
        echo "${PCAM_REGISTRY%/}"
    elif [[ -n "${GITHUB_REPOSITORY_OWNER:-}" ]]; then
        echo "ghcr.io/${GITHUB_REPOSITORY_OWNER,,}" # GHCR repository names are lower case
    else
        die "set PCAM_REGISTRY (e.g. ghcr.io/<owner>): where to push"
    fi
}

commit_sha() {
    local sha="${PCAM_COMMIT_SHA:-${GITHUB_SHA:-}}"
    [[ -n "$sha" ]] || sha="$(git rev-parse HEAD 2>/dev/null)" || die "not a git checkout: set PCAM_COMMIT_SHA"
    echo "$sha"
}

# The release tag of this build (v0.1.0 -> 0.1.0), or nothing. A v-tag must match pyproject.toml.
version_tag() {
    local tag="${PCAM_VERSION_TAG-}"
    if [[ -z "${PCAM_VERSION_TAG+set}" ]]; then
        if [[ "${GITHUB_REF_TYPE:-}" == tag ]]; then
            tag="${GITHUB_REF_NAME:-}"
        elif [[ -z "${GITHUB_ACTIONS:-}" ]]; then
            tag="$(git describe --exact-match --tags HEAD 2>/dev/null || true)"
        fi
    fi
    [[ -n "$tag" ]] || return 0
    local version="${tag#v}"
    if [[ "$tag" == v* && "$version" != "$(project_version)" ]]; then
        die "tag $tag does not match pyproject.toml's version $(project_version): bump one of them"
    fi
    echo "$version"
}

# The serving image of a registered model (PCAM_MODEL_RECORD: the registry.json `pcam model-get`
# writes): tagged with the model's version and, for a stage assignment, the stage.
model_tags() {
    [[ -n "${PCAM_MODEL_RECORD:-}" ]] || return 0
    [[ -f "$PCAM_MODEL_RECORD" ]] || die "PCAM_MODEL_RECORD=$PCAM_MODEL_RECORD not found: run make model-get first"
    python3 -c 'import json, sys
record = json.load(open(sys.argv[1]))
for key in ("version", "stage"):
    if record.get(key):
        print("model-" + record[key])' "$PCAM_MODEL_RECORD"
}

# image_tags / sif_tags: one tag per line, commit first.
image_tags() {
    local sha version tag
    sha="$(commit_sha)"
    echo "$TORCH_VARIANT-${sha:0:12}"
    if [[ -n "${PCAM_MODEL_RECORD:-}" ]]; then
        local model
        model="$(model_tags)" # a failure stops here: a `for ... in $(...)` would swallow it
        for tag in $model; do echo "$TORCH_VARIANT-$tag"; done
        return 0
    fi
    version="$(version_tag)"
    [[ -z "$version" ]] || echo "$TORCH_VARIANT-$version"
}

cmd_tags() {
    local reg tag tags
    reg="$(registry)"
    tags="$(image_tags)"
    for tag in $tags; do
        echo "$reg/$NAME:$tag"
        echo "oras://$reg/$NAME-sif:$tag"
    done
}

ref_file() { echo "${PCAM_BUILD_DIR:-build}/image-$TORCH_VARIANT.ref"; }

cmd_push() {
    if [[ "${PCAM_DRY_RUN:-0}" == 1 ]]; then pick_engine plan; else pick_engine; fi
    local reg tag tags first="" digest="" tls=()
    reg="$(registry)"
    tags="$(image_tags)"
    if [[ "${PCAM_DRY_RUN:-0}" != 1 ]]; then
        "$ENGINE" image inspect "$PCAM_IMAGE" >/dev/null 2>&1 ||
            die "image $PCAM_IMAGE not found in $ENGINE: build it first (make image TORCH_VARIANT=$TORCH_VARIANT)"
    fi
    if [[ "${PCAM_TLS_VERIFY:-1}" == 0 ]]; then
        [[ "$ENGINE" == podman ]] || die "PCAM_TLS_VERIFY=0 needs podman (docker: list the registry in insecure-registries)"
        tls=(--tls-verify=false)
    fi
    mkdir -p "$(dirname "$(ref_file)")"
    for tag in $tags; do
        local target="$reg/$NAME:$tag"
        do_run "$ENGINE" tag "$PCAM_IMAGE" "$target"
        if [[ "$ENGINE" == podman ]]; then
            do_run podman push "${tls[@]}" --digestfile "$(ref_file).digest" "$target"
        else
            do_run docker push "$target"
        fi
        [[ -n "$first" ]] || first="$target"
    done
    if [[ "${PCAM_DRY_RUN:-0}" == 1 ]]; then
        digest="sha256:dry-run"
    elif [[ "$ENGINE" == podman ]]; then
        digest="$(cat "$(ref_file).digest")"
        rm -f "$(ref_file).digest"
    else
        digest="$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$first" | sed -n "s|^$reg/$NAME@||p" | head -n 1)"
    fi
    [[ "$digest" == sha256:* ]] || die "could not read the digest of the pushed $first"
    local ref="$reg/$NAME@$digest"
    if [[ "${PCAM_DRY_RUN:-0}" != 1 ]]; then echo "$ref" >"$(ref_file)"; fi
    note "pushed $PCAM_IMAGE as $first ($ref); recorded in $(ref_file)"
    if [[ -n "${GITHUB_OUTPUT:-}" ]]; then echo "ref=$ref" >>"$GITHUB_OUTPUT"; fi
    echo "$ref"
}

# repro-check: the CI gate that the image reproduces the committed dvc.lock.
cmd_repro_check() {
    pick_engine
    git ls-files --error-unmatch dvc.lock >/dev/null 2>&1 ||
        die "dvc.lock is not committed: there is nothing to compare the run inside the image with"
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/pcam-repro-check.XXXXXX")"
    git clone --quiet --no-hardlinks "$REPO_ROOT" "$work/repo"
    chmod -R a+rwX "$work"
    local run=("$ENGINE" run --rm --network none --read-only
        --volume "$work:$work" --workdir "$work/repo"
        --env "TMPDIR=$work" --env "OMP_NUM_THREADS=${PCAM_REPRO_THREADS:-2}")
    if [[ "$ENGINE" == podman ]]; then
        run+=(--user 4242:4242 --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
        if command -v runc >/dev/null 2>&1; then run+=(--runtime runc); fi
    else
        run+=(--user "$(id -u):$(id -g)")
    fi
    note "dvc repro in $PCAM_IMAGE on a fresh clone of $(git rev-parse --short HEAD) ($work/repo)"
    local start=$SECONDS
    "${run[@]}" "$PCAM_IMAGE" dvc repro || die "dvc repro failed inside $PCAM_IMAGE (output above)"
    note "dvc repro inside $PCAM_IMAGE took $((SECONDS - start)) s"
    # The rule that fits how the run trained (bit-identical on any AVX2 CPU; within a stated
    # tolerance on a GPU or an older CPU), printed with its reason: scripts/repro-check.py.
    if ! "${run[@]}" "$PCAM_IMAGE" python scripts/repro-check.py; then
        git -C "$work/repo" diff -- dvc.lock >&2 || true
        die "dvc.lock made inside $PCAM_IMAGE does not reproduce the committed one (above; the run is kept in $work/repo). Either the image is not the environment that made the committed dvc.lock (the same Python, e.g. BASE_IMAGE=python:3.11.7-slim-bookworm, and torch version; or run the pipeline in the image and commit its dvc.lock), or a result is not reproducible"
    fi
    note "dvc.lock made inside $PCAM_IMAGE reproduces the committed one"
    rm -rf "$work"
}

cmd_install_apptainer() {
    if command -v apptainer >/dev/null 2>&1 && [[ "${PCAM_DRY_RUN:-0}" != 1 ]]; then
        note "apptainer is installed: $(apptainer --version)"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "install-apptainer knows only Ubuntu's apt (the GitHub runner): see https://apptainer.org/docs/admin/main/installation.html"
    local sudo=()
    [[ $EUID -eq 0 ]] || sudo=(sudo)
    do_run "${sudo[@]}" add-apt-repository -y ppa:apptainer/ppa
    do_run "${sudo[@]}" apt-get update
    do_run "${sudo[@]}" apt-get install -y --no-install-recommends apptainer
    do_run apptainer --version
}

# registry_def REF: containers/apptainer.def with its header pointing at the registry image REF,
# so the SIF keeps %environment, %test, %runscript and %labels.
registry_def() {
    local ref=$1
    printf 'Bootstrap: docker\nFrom: %s\n' "$ref"
    sed -e '1,/^From:/d' containers/apptainer.def
}

image_ref() {
    if [[ -n "${PCAM_IMAGE_REF:-}" ]]; then
        echo "$PCAM_IMAGE_REF"
    elif [[ -f "$(ref_file)" ]]; then
        cat "$(ref_file)"
    else
        die "no image reference: run 'make image-push' first, or set PCAM_IMAGE_REF=<registry>/pcam-pipeline@sha256:..."
    fi
}

apptainer_login() {
    local reg
    reg="$(registry)"
    [[ -n "${REGISTRY_TOKEN:-}" ]] || return 0
    export APPTAINER_DOCKER_USERNAME="${REGISTRY_USER:-${GITHUB_ACTOR:-}}"
    export APPTAINER_DOCKER_PASSWORD="$REGISTRY_TOKEN"
    if [[ "${PCAM_DRY_RUN:-0}" == 1 ]]; then
        do_run apptainer registry login --username "$APPTAINER_DOCKER_USERNAME" --password-stdin "oras://${reg%%/*}"
    else
        printf '%s' "$REGISTRY_TOKEN" |
            apptainer registry login --username "$APPTAINER_DOCKER_USERNAME" --password-stdin "oras://${reg%%/*}"
    fi
}

cmd_sif() {
    local ref def
    ref="$(image_ref)"
    mkdir -p build
    def=build/apptainer-registry.def
    registry_def "$ref" >"$def"
    note "building $PCAM_SIF from $ref ($def)"
    apptainer_login
    do_run apptainer build --force "$PCAM_SIF" "$def"
    do_run apptainer test "$PCAM_SIF"
    if [[ "${PCAM_DRY_RUN:-0}" != 1 ]]; then
        note "built $PCAM_SIF ($(du -h "$PCAM_SIF" | cut -f1)); sha256 $(sha256sum "$PCAM_SIF" | cut -d' ' -f1)"
    fi
}

cmd_sif_push() {
    local reg tag tags
    reg="$(registry)"
    tags="$(image_tags)"
    [[ -f "$PCAM_SIF" || "${PCAM_DRY_RUN:-0}" == 1 ]] || die "$PCAM_SIF not found: make sif-registry first"
    apptainer_login
    for tag in $tags; do
        do_run apptainer push "$PCAM_SIF" "oras://$reg/$NAME-sif:$tag"
    done
}

cmd_runner_disk() {
    if [[ "${GITHUB_ACTIONS:-}" != true && "${PCAM_DRY_RUN:-0}" != 1 ]]; then
        die "runner-disk deletes preinstalled toolchains: it runs on a GitHub-hosted runner only (GITHUB_ACTIONS=true)"
    fi
    local sudo=()
    [[ $EUID -eq 0 ]] || sudo=(sudo)
    do_run "${sudo[@]}" rm -rf /usr/share/dotnet /usr/local/lib/android /opt/ghc /usr/local/share/boost /opt/hostedtoolcache/CodeQL
    do_run "${sudo[@]}" mkdir -p /mnt/apptainer/cache /mnt/apptainer/tmp
    do_run "${sudo[@]}" chown -R "$(id -u):$(id -g)" /mnt/apptainer
    do_run df -h / /mnt
}

cmd_local_registry() {
    local action=${1:-} dir=${2:-} port=${3:-}
    [[ -n "$dir" && -n "$port" ]] || die "usage: containers/publish.sh local-registry start|stop DIR PORT"
    local pidfile="$dir/registry.pid"
    case "$action" in
        start)
            if ! command -v docker-registry >/dev/null 2>&1; then
                [[ $EUID -eq 0 ]] || die "docker-registry is not installed: apt-get install docker-registry (as root)"
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >&2 || {
                    apt-get update >&2
                    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry >&2
                } || die "apt-get install docker-registry failed (above)"
            fi
            mkdir -p "$dir/data"
            cat >"$dir/config.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
CONF
            # The Debian service would start it with its own config; start ours by hand, by PID.
            docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
            echo $! >"$pidfile"
            local i
            for i in $(seq 1 100); do
                if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "http://127.0.0.1:$port/v2/" 2>/dev/null; then
                    note "registry on 127.0.0.1:$port (pid $(cat "$pidfile"), data in $dir/data)"
                    return 0
                fi
                sleep 0.1
            done
            cat "$dir/registry.log" >&2
            die "the registry did not answer on 127.0.0.1:$port"
            ;;
        stop)
            [[ -f "$pidfile" ]] || return 0
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
            ;;
        *) die "usage: containers/publish.sh local-registry start|stop DIR PORT" ;;
    esac
}

case "${1:-}" in
    local-registry)
        shift
        cmd_local_registry "$@"
        ;;
    runner-disk) cmd_runner_disk ;;
    repro-check) cmd_repro_check ;;
    push) cmd_push ;;
    install-apptainer) cmd_install_apptainer ;;
    sif) cmd_sif ;;
    sif-push) cmd_sif_push ;;
    tags) cmd_tags ;;
    registry-def) registry_def "$(image_ref)" ;;
    *)
        usage >&2
        exit 2
        ;;
esac
