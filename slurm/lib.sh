# shellcheck shell=bash
# Job-side helpers shared by slurm/*.sbatch. Sourced (never executed) from the repository that was
# submitted from: `source "$SLURM_SUBMIT_DIR/slurm/lib.sh"`.
#
# Environment read here (all optional):
#   PCAM_REPO           repository submitted from (default: $SLURM_SUBMIT_DIR, i.e. where sbatch ran)
#   PCAM_SIF            Apptainer image: run dvc inside it with `apptainer exec --nv --cleanenv`
#   PCAM_IMAGE_DIGEST   the image's identity for provenance [sha256 of PCAM_SIF, computed once a job]
#   PCAM_REQUIRE_CUDA   auto | 1 | 0 [auto]: must the job train on the GPU? auto = when the partition
#                       matches PCAM_GPU_PARTITIONS. Then the job checks CUDA in its first minute
#                       (slurm/gpu-check.py) and passes train.device=cuda; it never falls back to CPU
#   PCAM_GPU_PARTITIONS comma-separated partition patterns that are GPU partitions [gpu_*]
#   PCAM_DVC_SITE_CACHE DVC's site cache (hash state, index) when the repository configures none
#                       [$HOME/.cache/pcam-pipeline/dvc-site-cache: kept across jobs, per user]
#   PCAM_VENV           virtual environment used without PCAM_SIF (default: <repo>/.venv)
#   PCAM_BIND           extra comma-separated bind paths for apptainer (e.g. a dataset on GPFS)
#   PCAM_STAGE_DATA=1   copy data/processed to node-local $TMPDIR and train/evaluate from there
#   PCAM_MAX_REQUEUES   how often a job may requeue itself after a time-limit signal (default 20)
#   PCAM_WORK_ROOT      where jobs make their isolated clones (repro, sweep, search, benchmark,
#                       serve; default: <repo>/.pcam-work; must be visible from every node)
#   PCAM_KEEP_WORKDIR=1 keep those clones after success (they are always kept after a failure)

PCAM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PCAM_DEVICE_ARGS=() # `-S train.device=cuda` on GPU partitions (pcam_gpu_check)

pcam_log() { printf '[pcam-slurm %(%H:%M:%S)T] %s\n' -1 "$*"; }
pcam_die() {
    printf '[pcam-slurm] error: %s\n' "$*" >&2
    exit 1
}

# --- where and how ---------------------------------------------------------------------------------

# pcam_repo_root: print the repository to run in, checked.
pcam_repo_root() {
    local repo=${PCAM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f $repo/dvc.yaml ]] || pcam_die "no dvc.yaml in '$repo': submit from the repository root (cd to it, then sbatch slurm/...), or set PCAM_REPO=/path/to/pcam-pipeline."
    (cd "$repo" && pwd -P)
}

# pcam_runtime_init REPO: choose Apptainer (PCAM_SIF) or the venv; fail early with the fix.
pcam_runtime_init() {
    local repo=$1
    PCAM_BINDS=()
    if [[ -n ${PCAM_SIF:-} ]]; then
        [[ -f $PCAM_SIF ]] || pcam_die "PCAM_SIF='$PCAM_SIF' does not exist: build it (see containers/) or unset PCAM_SIF to use the venv."
        PCAM_SIF=$(cd "$(dirname "$PCAM_SIF")" && pwd -P)/$(basename "$PCAM_SIF")
        command -v apptainer >/dev/null || pcam_die "PCAM_SIF is set but 'apptainer' is not on PATH on $(hostname): load it (e.g. 'module load apptainer') or unset PCAM_SIF."
        PCAM_RUNTIME=apptainer
        # What identifies the image in each checkpoint's provenance (models/*.provenance.json);
        # its sha256 is computed once per job, by pcam_print_env (after the GPU check: hashing
        # a 6 GB SIF on GPFS takes a while, and a job that cannot run should stop first).
        export PCAM_IMAGE=$PCAM_SIF
        pcam_bind_add "$repo"
        pcam_bind_add "${TMPDIR:-/tmp}"
        local extra
        IFS=, read -ra extra <<<"${PCAM_BIND:-}"
        for p in "${extra[@]}"; do [[ -n $p ]] && pcam_bind_add "$p"; done
    else
        PCAM_VENV=${PCAM_VENV:-$repo/.venv}
        [[ -x $PCAM_VENV/bin/dvc ]] || pcam_die "no dvc in '$PCAM_VENV/bin': run 'make setup' in $repo on a login node first, set PCAM_VENV to an existing environment, or set PCAM_SIF to an Apptainer image."
        PCAM_RUNTIME=venv
    fi
    PCAM_CACHE=$(pcam_cache_dir "$repo") || pcam_die "'dvc cache dir' failed in $repo (see above)."
    mkdir -p "$PCAM_CACHE" 2>/dev/null || true
    pcam_bind_add "$PCAM_CACHE" # a cache outside the repository (GPFS project space) must be visible
    if [[ -n ${PCAM_WORK_ROOT:-} ]]; then # the jobs' clones, made inside the runtime
        mkdir -p "$PCAM_WORK_ROOT" || pcam_die "cannot create PCAM_WORK_ROOT='$PCAM_WORK_ROOT': set it to a writable directory visible from every node."
        pcam_bind_add "$PCAM_WORK_ROOT"
    fi
    # DVC's site cache holds the hash state of the workspace files: in the image's default place
    # (per-job $TMPDIR) it would be lost with every job and GBs rehashed. Unless the repository
    # configures one (core.site_cache_dir, e.g. a group's on GPFS), keep one per user.
    if [[ -z ${DVC_SITE_CACHE_DIR:-} ]] && [[ -z $(cd "$repo" && pcam_run dvc config core.site_cache_dir 2>/dev/null) ]]; then
        export DVC_SITE_CACHE_DIR=${PCAM_DVC_SITE_CACHE:-${HOME:-/tmp}/.cache/pcam-pipeline/dvc-site-cache}
        mkdir -p "$DVC_SITE_CACHE_DIR" 2>/dev/null || pcam_die "cannot create DVC's site cache $DVC_SITE_CACHE_DIR: set PCAM_DVC_SITE_CACHE to a writable directory."
        pcam_bind_add "$DVC_SITE_CACHE_DIR"
    fi
    # Torch would use every core of the node; use what Slurm gave this job.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_ON_NODE:-1}}
    export DVC_NO_ANALYTICS=1
}

# pcam_bind_add PATH: add a host path to the apptainer bind list (deduplicated, nested paths skipped).
pcam_bind_add() {
    [[ ${PCAM_RUNTIME:-} == apptainer ]] || return 0
    local p=$1 b
    [[ -e $p ]] || return 0
    p=$(cd "$p" 2>/dev/null && pwd -P || echo "$p")
    for b in "${PCAM_BINDS[@]}"; do
        [[ $p == "$b" || $p == "$b"/* ]] && return 0
    done
    PCAM_BINDS+=("$p")
}

# pcam_run CMD...: run a command (dvc ...) in the chosen runtime, in the current directory.
# Environment that must reach the container is passed as APPTAINERENV_* (survives --cleanenv).
pcam_run() {
    if [[ ${PCAM_RUNTIME:-} == apptainer ]]; then
        local var
        for var in PCAM_TRAIN_DATA_DIR OMP_NUM_THREADS DVC_NO_ANALYTICS DVC_SITE_CACHE_DIR \
            CUDA_VISIBLE_DEVICES TMPDIR PCAM_IMAGE PCAM_IMAGE_DIGEST PCAM_NODE_DRIVER \
            PCAM_RUNTIME_DESC SLURM_JOB_ID SLURM_JOB_PARTITION SLURM_CLUSTER_NAME \
            PCAM_WORK_ROOT PCAM_COMMIT; do
            if [[ -n ${!var:-} ]]; then export "APPTAINERENV_$var=${!var}"; fi
        done
        # The checkout's code, whatever the image: a SIF pulled from the registry image has no
        # %environment to set this (the image's own .pth hook does the same; PCAM_USE_IMAGE_SRC=1
        # turns both off).
        if [[ -z ${PCAM_USE_IMAGE_SRC:-} && -f $PWD/src/pcam_pipeline/__init__.py ]]; then
            export APPTAINERENV_PYTHONPATH=$PWD/src
        else
            unset APPTAINERENV_PYTHONPATH
        fi
        local IFS=,
        apptainer exec --nv --cleanenv --bind "${PCAM_BINDS[*]}" "$PCAM_SIF" "$@"
    else
        # The same rule in the venv (whose pcam_pipeline may be an editable install of another
        # checkout): the job runs the code of the commit it was submitted with.
        if [[ -z ${PCAM_USE_IMAGE_SRC:-} && -f $PWD/src/pcam_pipeline/__init__.py ]]; then
            PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PATH=$PCAM_VENV/bin:$PATH VIRTUAL_ENV=$PCAM_VENV "$@"
        else
            PATH=$PCAM_VENV/bin:$PATH VIRTUAL_ENV=$PCAM_VENV "$@"
        fi
    fi
}

# pcam_cache_dir REPO: the DVC cache directory REPO uses (absolute).
pcam_cache_dir() {
    (cd "$1" && pcam_run dvc cache dir) | tail -n1
}

# --- what ran where ------------------------------------------------------------------------------

pcam_print_env() {
    local repo=$1
    pcam_log "job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} '${SLURM_JOB_NAME:-}' restart ${SLURM_RESTART_COUNT:-0} partition ${SLURM_JOB_PARTITION:-none}"
    echo "host:      $(hostname) ($(uname -srm))"
    echo "cpus:      ${SLURM_CPUS_ON_NODE:-?} (OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})"
    echo "gpus:      CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
    # SBATCH_SIGNAL reaches the job from submit.sh's environment (sbatch exports it by default).
    echo "signal:    ${SBATCH_SIGNAL:-as the #SBATCH --signal line says, if any}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 |
            sed 's/^/           /' || true
        # --query-gpu names a MIG slice's parent GPU only; the instances the node is split into
        # (`MIG 1g.5gb Device 0: (UUID: MIG-...)`) come from the listing (docs/slurm.md#mig-slices).
        nvidia-smi -L 2>/dev/null | grep -E '^[[:space:]]+MIG ' | sed 's/^[[:space:]]*/           /' || true
    else
        echo "           (nvidia-smi not found on this host)"
    fi
    local commit dirty
    commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout?)")
    dirty=$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
    echo "commit:    $commit$( ((dirty > 0)) && echo " (+$dirty modified tracked files)")"
    echo "repo:      $repo"
    if [[ $PCAM_RUNTIME == apptainer ]]; then
        export PCAM_IMAGE_DIGEST=${PCAM_IMAGE_DIGEST:-sha256:$(sha256sum "$PCAM_SIF" | cut -d' ' -f1)}
        echo "image:     $PCAM_SIF $PCAM_IMAGE_DIGEST"
        echo "apptainer: $(apptainer --version 2>&1 | head -n1)"
        local IFS=,
        echo "binds:     ${PCAM_BINDS[*]}"
    else
        echo "image:     none (venv $PCAM_VENV, $("$PCAM_VENV/bin/python" --version 2>&1))"
    fi
    echo "dvc cache: $PCAM_CACHE"
    echo "dvc site:  ${DVC_SITE_CACHE_DIR:-as configured in the repository (core.site_cache_dir)}"
    # the link type DVC will use, and a warning for a site cache on a network file system
    (cd "$repo" && pcam_run python -m pcam_pipeline.dvc.cache) || true
    echo "device:    ${PCAM_DEVICE_ARGS[*]:-train.device from params.yaml (not a GPU partition)}"
}

# --- GPU jobs: CUDA or nothing -----------------------------------------------------------------

# pcam_gpu_job: whether this job must train on the GPU (PCAM_REQUIRE_CUDA, the partition).
pcam_gpu_job() {
    case ${PCAM_REQUIRE_CUDA:-auto} in
        1) return 0 ;;
        0) return 1 ;;
        auto)
            local pattern patterns
            IFS=, read -ra patterns <<<"${PCAM_GPU_PARTITIONS:-gpu_*}"
            for pattern in "${patterns[@]}"; do
                # shellcheck disable=SC2053  # a glob pattern on purpose
                [[ -n $pattern && ${SLURM_JOB_PARTITION:-} == $pattern ]] && return 0
            done
            return 1
            ;;
        *) pcam_die "PCAM_REQUIRE_CUDA='$PCAM_REQUIRE_CUDA': use auto, 1 or 0." ;;
    esac
}

# pcam_gpu_check (after pcam_runtime_init): on a GPU partition, fail now - with the fix - unless
# CUDA works inside the runtime and the node's driver is new enough for the image; then set
# PCAM_DEVICE_ARGS so training runs with train.device=cuda (an error, never a CPU fallback).
pcam_gpu_check() {
    PCAM_DEVICE_ARGS=()
    if ! pcam_gpu_job; then
        pcam_log "partition '${SLURM_JOB_PARTITION:-none}' is not a GPU partition (PCAM_GPU_PARTITIONS=${PCAM_GPU_PARTITIONS:-gpu_*}): train.device as params.yaml says"
        return 0
    fi
    local start=$SECONDS
    PCAM_NODE_DRIVER=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        PCAM_NODE_DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)
    fi
    export PCAM_NODE_DRIVER
    if [[ $PCAM_RUNTIME == apptainer ]]; then
        export PCAM_RUNTIME_DESC="the image $PCAM_SIF"
    else
        export PCAM_RUNTIME_DESC="the venv $PCAM_VENV"
    fi
    pcam_log "GPU partition '${SLURM_JOB_PARTITION:-}': checking CUDA in $PCAM_RUNTIME_DESC (slurm/gpu-check.py)"
    if ! pcam_run python "$PCAM_LIB_DIR/gpu-check.py"; then
        pcam_die "the GPU check failed after $((SECONDS - start)) s (the reason and the fix are above): stopping before any work rather than training on the CPU at GPU rates."
    fi
    PCAM_DEVICE_ARGS=(-S train.device=cuda)
}

# --- node-local data staging ---------------------------------------------------------------------

# pcam_stage_data REPO: with PCAM_STAGE_DATA=1, bring data/processed up to date, copy it to
# $TMPDIR and point PCAM_TRAIN_DATA_DIR at the copy (train/evaluate read it from there).
pcam_stage_data() {
    local repo=$1
    [[ ${PCAM_STAGE_DATA:-0} == 1 ]] || return 0
    local scratch=${TMPDIR:-/tmp}
    [[ -d $scratch && -w $scratch ]] || pcam_die "PCAM_STAGE_DATA=1 but TMPDIR='$scratch' is not a writable directory."
    pcam_log "staging: bringing data/processed up to date (dvc repro preprocess)"
    (cd "$repo" && pcam_run dvc repro preprocess) || pcam_die "staging: 'dvc repro preprocess' failed (see above)."
    PCAM_STAGED_DIR=$scratch/pcam-${SLURM_JOB_ID:-$$}/processed
    rm -rf "$PCAM_STAGED_DIR"
    mkdir -p "$PCAM_STAGED_DIR"
    # --dereference: with cache.type symlink the workspace holds links into the (GPFS) cache.
    cp -r --dereference "$repo/data/processed/." "$PCAM_STAGED_DIR/"
    local want got
    want=$(cd "$repo/data/processed" && find -L . -type f -printf '%P %s\n' | sort)
    got=$(cd "$PCAM_STAGED_DIR" && find . -type f -printf '%P %s\n' | sort)
    [[ $want == "$got" ]] || pcam_die "staging: the copy in $PCAM_STAGED_DIR differs from data/processed (disk full?)."
    export PCAM_TRAIN_DATA_DIR=$PCAM_STAGED_DIR
    pcam_log "staging: PCAM_TRAIN_DATA_DIR=$PCAM_STAGED_DIR ($(du -sh "$PCAM_STAGED_DIR" | cut -f1))"
}

pcam_unstage_data() {
    if [[ -n ${PCAM_STAGED_DIR:-} ]]; then rm -rf "$(dirname "$PCAM_STAGED_DIR")"; fi
}

# --- time limits: checkpoint, requeue ------------------------------------------------------------

PCAM_STOP_SIGNAL=""
PCAM_STOP_FILE=""

# The trap only notes the signal, in the file the relay watches (python -m pcam_pipeline.train.relay,
# the parent of the command): the relay sends it to `pcam train` once training runs and has set
# its handler. The signal may come at any moment: before the command has started, between two
# stages, or while Python still imports torch.
_pcam_on_signal() {
    PCAM_STOP_SIGNAL=$1
    echo "$1" >"$PCAM_STOP_FILE"
    pcam_log "received SIG$1 (time limit near, or scancel --signal): stopping training at the next batch"
}

# pcam_run_preemptible CMD...: run CMD (in the runtime, under the relay) so that SIGUSR1 to the
# batch shell (#SBATCH --signal=B:USR1@secs, or `scancel --signal=USR1 --batch JOBID`) reaches
# training. Sets PCAM_RC to the command's exit status and PCAM_STOP_SIGNAL if a signal came.
# The relay is the checkout's (src/ on PYTHONPATH); with PCAM_USE_IMAGE_SRC=1 the image's.
pcam_run_preemptible() {
    PCAM_STOP_SIGNAL=""
    # In $TMPDIR: node-local, and bound into the image.
    PCAM_STOP_FILE=$(mktemp "${TMPDIR:-/tmp}/pcam-stop.XXXXXX") ||
        pcam_die "cannot create a file in TMPDIR='${TMPDIR:-/tmp}': set TMPDIR to a writable directory."
    trap '_pcam_on_signal USR1' USR1
    pcam_run python -m pcam_pipeline.train.relay --stop-file "$PCAM_STOP_FILE" -- "$@" &
    local child=$! tick
    # Never block on the command itself: a signal that arrives just before a blocking `wait`
    # would be noted only when the command ends. A trapped signal ends this short wait at once.
    while kill -0 "$child" 2>/dev/null; do
        sleep 1 &
        tick=$!
        wait "$tick" 2>/dev/null || true
        kill "$tick" 2>/dev/null || true
    done
    wait "$child" && PCAM_RC=0 || PCAM_RC=$?
    trap - USR1
    rm -f "$PCAM_STOP_FILE"
}

# pcam_finish_or_requeue WHAT: after pcam_run_preemptible. A stop signal followed by a failed
# command means training saved its checkpoint: requeue this job (same job id; the rerun resumes
# from models/last.pt). Otherwise exit with the command's status.
pcam_finish_or_requeue() {
    local what=$1
    if [[ -n $PCAM_STOP_SIGNAL && $PCAM_RC != 0 ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${PCAM_MAX_REQUEUES:-20}
        if ((restarts >= max)); then
            pcam_die "$what stopped by SIG$PCAM_STOP_SIGNAL after $restarts requeues (PCAM_MAX_REQUEUES=$max): not requeueing again; resubmit the same job to resume from models/last.pt, or ask for a longer --time."
        fi
        pcam_log "$what stopped by SIG$PCAM_STOP_SIGNAL (exit $PCAM_RC); requeueing job $SLURM_JOB_ID (restart $((restarts + 1))), it resumes from models/last.pt"
        pcam_unstage_data
        if scontrol requeue "$SLURM_JOB_ID"; then
            # slurmctld now ends this run and queues the job again; nothing more to do here.
            exit 0
        fi
        pcam_die "scontrol requeue $SLURM_JOB_ID failed: resubmit the job; it resumes from models/last.pt."
    fi
    if [[ $PCAM_RC != 0 ]]; then
        pcam_log "$what failed with exit status $PCAM_RC (the stage's error is above)"
        exit "$PCAM_RC"
    fi
    pcam_log "$what finished"
}

# --- isolated clones (repro, sweep, benchmark, serve) -------------------------------------------

# pcam_clone SUBMIT COMMIT NAME (after pcam_runtime_init SUBMIT): the job's own clone of SUBMIT at
# COMMIT, named NAME under the work root, sharing SUBMIT's DVC cache (one shared cache: stages
# already run are restored from it, not recomputed). Made by `python -m
# pcam_pipeline.experiments.job_clone clone`, which owns the work root and the rule for a clone
# left by an earlier attempt of the same job (requeue): it is kept as it stands, so training
# resumes. Sets PCAM_WORK (its path) and PCAM_CLONE_REUSED (1: an earlier attempt's).
pcam_clone() {
    local submit=$1 commit=$2 name=$3 made
    pcam_bind_add "$submit"
    # The code of the checkout lib.sh is sourced from, as for the rest of this library.
    made=$(cd "$submit" && pcam_run python -m pcam_pipeline.experiments.job_clone clone "$submit" "$name" --commit "$commit") ||
        pcam_die "no clone of $submit at $commit for '$name' (the reason and the fix are above)."
    made=${made##*$'\n'} # its answer is the last line: "new|reused PATH"
    PCAM_WORK=${made#* }
    PCAM_CLONE_REUSED=0
    if [[ ${made%% *} == reused ]]; then PCAM_CLONE_REUSED=1; fi
    pcam_bind_add "$PCAM_WORK"
}

# --- experiment jobs (repro, sweep): a clone, `dvc exp run`, the result pushed back ----------------

# pcam_exp_job SUBMIT WORK NAME ARGS...: in the clone WORK (pcam_clone, current directory), run
# `dvc exp run -n NAME ARGS... [-S train.device=cuda]`, requeue on a stop signal, and push the
# experiment to SUBMIT (job_clone push, its origin): it shows there in `dvc exp show`, and
# `dvc exp branch NAME NAME && git merge NAME && dvc checkout --allow-missing` brings its results
# into the workspace (docs/slurm.md). The submitting checkout is never
# locked by the job. WORK is removed after the push unless PCAM_KEEP_WORKDIR=1.
pcam_exp_job() {
    local submit=$1 work=$2 name=$3
    shift 3
    local existing
    existing=$(pcam_run dvc exp list --name-only 2>/dev/null || true)
    if grep -qx "$name" <<<"$existing"; then
        pcam_log "experiment '$name' exists already (an earlier attempt finished it): pushing only"
    elif ((${PCAM_CLONE_REUSED:-0})); then
        # A requeued attempt: `dvc exp run` would first check out the committed outputs (with
        # force), replacing the models/last.pt the stopped attempt saved. The clone already has
        # the experiment's params (the first attempt's -S): finish it with `dvc repro`, which
        # resumes from models/last.pt, then record the workspace as the experiment.
        local -a repro_args=()
        while (($#)); do
            case $1 in
                -S | --set-param) shift ;;
                -S* | --set-param=*) ;;
                *) repro_args+=("$1") ;;
            esac
            shift
        done
        trap pcam_unstage_data EXIT
        pcam_stage_data "$work"
        pcam_log "resuming: dvc repro ${repro_args[*]} (params as the first attempt set them), then dvc exp save -n $name"
        pcam_run_preemptible dvc repro "${repro_args[@]}"
        pcam_finish_or_requeue "dvc repro (experiment $name)"
        # dvc.yaml: the pipeline's outputs only (data.dvc's data/raw may never have been fetched).
        pcam_run dvc exp save -n "$name" dvc.yaml || pcam_die "dvc exp save -n $name failed in $work (kept)."
    else
        trap pcam_unstage_data EXIT
        pcam_stage_data "$work"
        pcam_log "running: dvc exp run -n $name $* ${PCAM_DEVICE_ARGS[*]}"
        pcam_run_preemptible dvc exp run -n "$name" "$@" "${PCAM_DEVICE_ARGS[@]}"
        pcam_finish_or_requeue "dvc exp run $name"
    fi
    # Send the experiment (a git ref) to the submitting repository, retried; the error names where
    # it is kept. Outputs are in the shared cache already; PCAM_PUSH_CACHE=1 also pushes them to
    # the default DVC remote.
    local push_args=()
    if [[ ${PCAM_PUSH_CACHE:-0} == 1 ]]; then push_args=(--with-cache); fi
    (cd "$submit" && pcam_run python -m pcam_pipeline.experiments.job_clone push "$work" "$name" "${push_args[@]}") ||
        pcam_die "experiment '$name' was not sent to $submit (the reason, and how to send it by hand, are above)."
    # Where and in which image each checkpoint was made (not DVC outputs): kept beside the job's
    # log, as the clone goes.
    if compgen -G "models/*.provenance.json" >/dev/null; then
        mkdir -p "$submit/logs/$name"
        cp models/*.provenance.json "$submit/logs/$name/"
        pcam_log "checkpoint provenance: $submit/logs/$name/"
    fi
    if [[ ${PCAM_KEEP_WORKDIR:-0} != 1 ]]; then
        cd "$submit" || pcam_die "cannot cd to $submit; the clone $work is kept."
        rm -rf "$work"
    fi
}
