#!/usr/bin/env bash
# Submit a pipeline job with the site defaults applied (see slurm/site.env).
#
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] repro [DVC_REPRO_ARGS...]
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] sweep GRID_FILE
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] benchmark
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] search STUDY_FILE [--array=0-7 ...]   (one worker a task)
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] serve [PCAM_SERVE_OPTIONS...]   (--precision int8, ...)
#   slurm/submit.sh [--site SITE] [SBATCH_OPTIONS...] slides LIST --out DIR [--per-task N] [PCAM_SLIDES_OPTIONS...]
#       (an array, one task per N slides, then the cohort table; prints both job ids)
#
# e.g. `slurm/submit.sh --time=12:00:00 repro`, `slurm/submit.sh -p gpu_h100 benchmark`;
# a course account: `slurm/submit.sh --site snellius-course -p thin_course repro` (SITE: a name in
# slurm/sites/ or a file; the same as PCAM_SLURM_SITE=SITE);
# all GPUs of a node: `--gpus=4 repro`; two nodes: `--nodes=2 --ntasks-per-node=4 --gpus-per-node=4
# repro` (docs/distributed.md).
# Runs sbatch from the repository root (jobs run there), creates logs/, records the current commit
# in PCAM_COMMIT (every job runs exactly that commit, in a clone of its own) and, for a sweep, sets
# --array=1-N from the grid file. CPUs per GPU follow the partition (PCAM_CPUS_PER_GPU) unless set;
# PCAM_STAGE_DATA=1 also asks for nodes with local NVMe (PCAM_STAGE_CONSTRAINT). A partition that
# is listed in PCAM_CPU_PARTITION_CPUS (PARTITION:CPUS,...) gets no GPU and those cores. With
# PCAM_SIGNAL_LEAD=PERCENT:FLOOR:CAP (and no SBATCH_SIGNAL), the time-limit signal comes PERCENT of
# the time limit before it, at least FLOOR and at most CAP seconds. A serve job takes its own
# shares, not the training jobs': PCAM_SERVE_PARTITION, PCAM_SERVE_CPUS, PCAM_SERVE_MEM, and a GPU
# only when asked for (--gpus=N, or PCAM_SERVE_GPUS). Prints the job id.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

die() {
    echo "submit.sh: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

declare -A SEEN=()

# apply_env_file FILE: KEY=VALUE lines; a key already in the environment keeps its value.
apply_env_file() {
    local file=$1 line key value n=0
    [[ -f $file ]] || die "site file '$file' not found (PCAM_SLURM_SITE)."
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] ||
            die "$file:$n: expected KEY=VALUE (upper-case key, no spaces around '='), got: $line"
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        [[ $key == SBATCH_* || $key == PCAM_* ]] ||
            die "$file:$n: unknown key '$key': only SBATCH_* (sbatch input variables) and PCAM_* keys belong here."
        # The environment, or an earlier file (even with an empty value = "unset"), wins.
        [[ -n ${!key+set} || -n ${SEEN[$key]:-} ]] && continue
        SEEN[$key]=1
        if [[ -n $value ]]; then export "$key=$value"; fi
    done <"$file"
}

# site_file SITE: a name in slurm/sites/ (snellius-course) or the path of a site file.
site_file() {
    if [[ $1 == */* || $1 == *.env ]]; then
        echo "$1"
    elif [[ -f $repo/slurm/sites/$1.env ]]; then
        echo "$repo/slurm/sites/$1.env"
    else
        local known=() file
        for file in "$repo"/slurm/sites/*.env; do [[ -f $file ]] && known+=("$(basename "$file" .env)"); done
        die "site '$1' is neither a file nor one of slurm/sites/: ${known[*]:-none}."
    fi
}

# seconds LIMIT: a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds.
seconds() {
    local limit=$1 days=0 h=0 m=0 s=0
    if [[ $limit =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?(:([0-9]+))?$ ]]; then
        days=${BASH_REMATCH[1]} h=${BASH_REMATCH[2]} m=${BASH_REMATCH[4]:-0} s=${BASH_REMATCH[6]:-0}
    elif [[ $limit =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        h=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
    elif [[ $limit =~ ^([0-9]+)(:([0-9]+))?$ ]]; then
        m=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]:-0}
    else
        die "time limit '$limit' is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS)."
    fi
    echo $((((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s))
}

# signal_lead LIMIT_SECONDS RULE: PERCENT:FLOOR:CAP -> PERCENT of the limit, within [FLOOR, CAP].
signal_lead() {
    local limit=$1 rule=$2 lead
    [[ $rule =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]] ||
        die "PCAM_SIGNAL_LEAD='$rule' is not PERCENT:FLOOR:CAP (e.g. 10:60:600)."
    lead=$((limit * BASH_REMATCH[1] / 100))
    ((lead < BASH_REMATCH[2])) && lead=${BASH_REMATCH[2]}
    ((lead > BASH_REMATCH[3])) && lead=${BASH_REMATCH[3]}
    echo "$lead"
}

sbatch_opts=()
while (($#)); do
    case $1 in
        repro | sweep | benchmark | search | serve | slides) break ;;
        -h | --help) usage ;;
        --site)
            [[ -n ${2:-} ]] || die "--site needs a site name (slurm/sites/) or a site file."
            PCAM_SLURM_SITE=$2
            shift
            ;;
        --site=*) PCAM_SLURM_SITE=${1#--site=} ;;
        *) sbatch_opts+=("$1") ;;
    esac
    shift
done
(($#)) || usage
what=$1
shift
script=$repo/slurm/$what.sbatch
[[ -f $script ]] || die "$script not found."

if [[ -n ${PCAM_SLURM_SITE:-} ]]; then apply_env_file "$(site_file "$PCAM_SLURM_SITE")"; fi
apply_env_file "$repo/slurm/site.env"

command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node (or start slurm/local-cluster.sh and export SLURM_CONF)."
git -C "$repo" rev-parse HEAD >/dev/null 2>&1 || die "$repo is not a git repository with a commit: DVC experiments and the job's provenance need one."
if [[ $what == repro || $what == sweep || $what == search ]]; then
    # The job saves its result as a DVC experiment, a git commit made in its clone (job_clone copies
    # this identity there): without one, `dvc exp save` fails after hours of training.
    for key in user.name user.email; do
        [[ -n $(git -C "$repo" config "$key" || true) ]] ||
            die "git $key is not set for $repo: the job records its result as a DVC experiment (a git commit). Set it: git config --global $key '...'"
    done
fi

case $what in
    sweep)
        (($# == 1)) || die "usage: slurm/submit.sh sweep GRID_FILE"
        grid=$1
        [[ -f $grid ]] || die "grid file '$grid' not found."
        grid=$(cd "$(dirname "$grid")" && pwd -P)/$(basename "$grid")
        n=$(grep -c -v -E '^[[:space:]]*(#|$)' "$grid" || true)
        ((n > 0)) || die "$grid has no task lines (one line of 'dvc exp run' options per task)."
        have_array=0
        for o in "${sbatch_opts[@]}"; do [[ $o == --array* || $o == -a* ]] && have_array=1; done
        ((have_array)) || sbatch_opts+=("--array=1-$n")
        set -- "$grid"
        ;;
    search)
        (($# >= 1)) || die "usage: slurm/submit.sh search STUDY_FILE [--array=0-N (one worker a task)]"
        study=$1
        shift
        [[ -f $study ]] || die "study file '$study' not found."
        study=$(cd "$(dirname "$study")" && pwd -P)/$(basename "$study")
        sbatch_opts+=("$@") # options after the study file go to sbatch too (--array=0-7)
        have_array=0
        for o in "${sbatch_opts[@]}"; do [[ $o == --array* || $o == -a* ]] && have_array=1; done
        ((have_array)) || sbatch_opts+=("--array=0-1")
        set -- "$study"
        ;;
    benchmark) (($# == 0)) || die "benchmark takes no arguments (choose the partition with -p PARTITION)." ;;
    slides)
        (($# >= 1)) || die "usage: slurm/submit.sh slides LIST --out DIR [--per-task N] [PCAM_SLIDES_OPTIONS...]"
        list=$1
        shift
        [[ -e $list ]] || die "slide list '$list' not found (a file of slide paths, one a line, or a directory of slides)."
        # The job runs in the repository root: paths as absolute ones, from here.
        absolute() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
        list=$(absolute "$list")
        per_task=1 out="" rest=()
        while (($#)); do
            case $1 in
                --per-task) per_task=${2:-} && shift ;;
                --per-task=*) per_task=${1#--per-task=} ;;
                --out) out=$(absolute "${2:-}") && rest+=(--out "$out") && shift ;;
                --out=*) out=$(absolute "${1#--out=}") && rest+=(--out "$out") ;;
                --chunk | --chunk=* | --cohort-only) die "slides: the job sets $1 itself (one chunk a task, the table after the array)." ;;
                *) rest+=("$1") ;;
            esac
            shift
        done
        [[ -n $out ]] || die "slides: give --out DIR, the results directory every task writes into."
        [[ $per_task =~ ^[1-9][0-9]*$ ]] || die "slides: --per-task '$per_task' is not a positive number of slides."
        if [[ -d $list ]]; then
            n=$(find "$list" -maxdepth 1 -type f ! -name '.*' | wc -l)
        else
            n=$(grep -c -v -E '^[[:space:]]*(#|$)' "$list" || true)
        fi
        ((n > 0)) || die "$list lists no slides."
        tasks=$(((n + per_task - 1) / per_task))
        for o in "${sbatch_opts[@]}"; do
            [[ $o == --array* || $o == -a* ]] && die "slides: the array is one task per $per_task slide(s) (--per-task N), not --array."
        done
        sbatch_opts+=("--array=0-$((tasks - 1))")
        echo "submit.sh: $n slides of $list in $tasks array task(s) of $per_task; results in $out" >&2
        set -- "$list" "$per_task" "${rest[@]}"
        ;;
    serve)
        # The job chooses these (a per-job token file, the node's address, a free port).
        for o in "$@"; do
            case $o in
                --host | --host=* | --port | --port=* | --token-file | --token-file=*)
                    die "serve: the job sets ${o%%=*} itself (the node's address, a free port, a per-job token file); set PCAM_SERVE_HOST or PCAM_SERVE_PORT to choose the address or port."
                    ;;
            esac
        done
        ;;
esac
if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "submit.sh: warning: uncommitted changes in tracked files; the $what job runs the last commit (HEAD), in a clone of its own." >&2
fi

# A server is no training job: the site's training shares (a GPU, CPUs per GPU, 60G) are not its.
# Its partition is PCAM_SERVE_PARTITION (site file or environment; else the site's), its cores
# PCAM_SERVE_CPUS and memory PCAM_SERVE_MEM (else serve.sbatch's #SBATCH lines), and it gets a GPU
# only when asked: a --gpus/--gres option, or PCAM_SERVE_GPUS=N.
serve_gpus=0
if [[ $what == serve ]]; then
    unset SBATCH_GPUS SBATCH_CPUS_PER_GPU SBATCH_MEM_PER_NODE
    if [[ -n ${PCAM_SERVE_PARTITION:-} ]]; then export SBATCH_PARTITION=$PCAM_SERVE_PARTITION; fi
    if [[ -n ${PCAM_SERVE_MEM:-} ]]; then export SBATCH_MEM_PER_NODE=$PCAM_SERVE_MEM; fi
    serve_cpus=0
    for o in "${sbatch_opts[@]}"; do
        case $o in
            -G* | --gpus* | --gres=*gpu* | --gres) serve_gpus=1 ;; # --gpus-per-node, ... too
            -c* | --cpus-per-task*) serve_cpus=1 ;;
        esac
    done
    if ((!serve_gpus)) && [[ ${PCAM_SERVE_GPUS:-0} != 0 ]]; then
        export SBATCH_GPUS=$PCAM_SERVE_GPUS
        serve_gpus=1
    fi
    if ((!serve_cpus)) && [[ -n ${PCAM_SERVE_CPUS:-} ]]; then sbatch_opts+=("--cpus-per-task=$PCAM_SERVE_CPUS"); fi
fi

# The partition the job goes to: the last -p/--partition option, else SBATCH_PARTITION.
partition=${SBATCH_PARTITION:-}
have_cpus=0 have_constraint=0 gpus_per_node=0 have_signal=0
time_limit=${SBATCH_TIMELIMIT:-}
for ((i = 0; i < ${#sbatch_opts[@]}; i++)); do
    o=${sbatch_opts[i]}
    case $o in
        -p | --partition) partition=${sbatch_opts[i + 1]:-} ;;
        -p?*) partition=${o#-p} ;;
        --partition=*) partition=${o#--partition=} ;;
        -t | --time) time_limit=${sbatch_opts[i + 1]:-} ;;
        -t?*) time_limit=${o#-t} ;;
        --time=*) time_limit=${o#--time=} ;;
        --signal | --signal=*) have_signal=1 ;;
        --cpus-per-gpu | --cpus-per-gpu=*) have_cpus=1 ;;
        -C | -C?* | --constraint | --constraint=*) have_constraint=1 ;;
        --gpus-per-node | --gpus-per-node=* | --gpus-per-task | --gpus-per-task=*) gpus_per_node=1 ;;
    esac
done
# GPUs per node or per task (several nodes: --nodes=2 --ntasks-per-node=4 --gpus-per-node=4)
# replace the site's total (SBATCH_GPUS): sbatch takes one way of counting them.
if ((gpus_per_node)); then unset SBATCH_GPUS; fi
# A partition that hands out MIG slices (the course file: PCAM_GPU_SLICE=gpu_course:CPUS:MEMORY): a
# job there gets one slice's share, its CPUs and memory per GPU from one setting so the two cannot
# drift apart, instead of a site file's per-node memory. An option (--cpus-per-gpu, --mem*) or the
# user's environment (SBATCH_CPUS_PER_GPU, SBATCH_MEM_PER_NODE/_PER_GPU/_PER_CPU) still wins.
from_user() { [[ -n ${!1:-} && -z ${SEEN[$1]:-} ]]; }
have_mem=0 slices=${SBATCH_GPUS:-1}
for ((i = 0; i < ${#sbatch_opts[@]}; i++)); do
    o=${sbatch_opts[i]}
    case $o in
        --mem | --mem=* | --mem-per-*) have_mem=1 ;;
        # The slices asked for (per node): the count ends the spec (2, a100_1g.5gb:2, gpu:2).
        -G | --gpus | --gpus-per-node | --gres) slices=${sbatch_opts[i + 1]:-1} ;;
        -G?*) slices=${o#-G} ;;
        --gpus=* | --gpus-per-node=* | --gres=*) slices=${o#*=} ;;
    esac
done
slices=${slices##*:}
[[ $slices =~ ^[1-9][0-9]*$ ]] || slices=1
IFS=, read -ra table <<<"${PCAM_GPU_SLICE:-}"
if [[ $what == serve ]]; then table=(); fi # a server asks for its own share (above)
for entry in "${table[@]}"; do
    [[ $entry =~ ^([^:]+):([0-9]+):([0-9]+[KMGT]?)$ ]] ||
        die "PCAM_GPU_SLICE entry '$entry' is not PARTITION:CPUS:MEMORY (e.g. gpu_course:2:16G)."
    [[ -n $partition && ${BASH_REMATCH[1]} == "$partition" ]] || continue
    if ((!have_cpus)) && ! from_user SBATCH_CPUS_PER_GPU; then
        export SBATCH_CPUS_PER_GPU=${BASH_REMATCH[2]}
    fi
    memory="the default"
    if ((!have_mem)) && ! from_user SBATCH_MEM_PER_NODE && ! from_user SBATCH_MEM_PER_GPU &&
        ! from_user SBATCH_MEM_PER_CPU; then
        # As memory per node, the slices' worth: sbatch (22.05) keeps the scripts' `#SBATCH
        # --mem=60G` beside an SBATCH_MEM_PER_GPU, and refuses --mem-per-gpu beside it, while
        # SBATCH_MEM_PER_NODE replaces it. sbatch takes one way of sizing memory.
        unset SBATCH_MEM_PER_GPU SBATCH_MEM_PER_CPU
        [[ ${BASH_REMATCH[3]} =~ ^([0-9]+)([KMGT]?)$ ]]
        export SBATCH_MEM_PER_NODE=$((10#${BASH_REMATCH[1]} * slices))${BASH_REMATCH[2]}
        memory="${BASH_REMATCH[1]}${BASH_REMATCH[2]} memory per slice (--mem=$SBATCH_MEM_PER_NODE for $slices)"
    elif ((have_mem)); then
        memory="the memory of your --mem option"
    else
        memory="your ${SBATCH_MEM_PER_NODE:-${SBATCH_MEM_PER_GPU:-${SBATCH_MEM_PER_CPU:-}}} memory"
    fi
    echo "submit.sh: $partition hands out GPU slices (MIG): ${SBATCH_CPUS_PER_GPU:-?} CPUs per slice and $memory (PCAM_GPU_SLICE=$entry; the course's to confirm, docs/slurm.md#mig-slices)." >&2
done
# CPUs per GPU follow the partition's nodes (site.env: PCAM_CPUS_PER_GPU=gpu_a100:18,gpu_h100:16),
# unless given as an option, in the environment or in a site file.
if [[ $what != serve ]] && ((!have_cpus)) && [[ -z ${SBATCH_CPUS_PER_GPU:-} && -n $partition ]]; then
    IFS=, read -ra table <<<"${PCAM_CPUS_PER_GPU:-}"
    for entry in "${table[@]}"; do
        [[ $entry == *:* ]] || die "PCAM_CPUS_PER_GPU entry '$entry' is not PARTITION:CPUS (e.g. gpu_h100:16)."
        if [[ ${entry%%:*} == "$partition" ]]; then export SBATCH_CPUS_PER_GPU=${entry#*:}; fi
    done
fi
# A CPU partition (site file: PCAM_CPU_PARTITION_CPUS=thin_course:8): no GPU, although the
# scripts' #SBATCH lines ask for one, and the cores as --mincpus (sbatch refuses --cpus-per-task
# beside the scripts' --cpus-per-gpu, and with no GPU their --cpus-per-gpu=18 makes Slurm refuse
# the job as "Requested node configuration is not available": 1 here is a harmless stand-in).
# Other partitions keep the GPU settings above.
IFS=, read -ra table <<<"${PCAM_CPU_PARTITION_CPUS:-}"
if [[ $what == serve ]]; then table=(); fi # serve asks for its cores itself (above)
for entry in "${table[@]}"; do
    [[ $entry == *:* ]] || die "PCAM_CPU_PARTITION_CPUS entry '$entry' is not PARTITION:CPUS (e.g. thin_course:8)."
    if [[ -n $partition && ${entry%%:*} == "$partition" ]]; then
        export SBATCH_GPUS=0 SBATCH_CPUS_PER_GPU=1
        sbatch_opts+=("--mincpus=${entry#*:}")
    fi
done
# A GPU partition takes jobs with a GPU; a server without one belongs on a CPU partition.
if [[ $what == serve ]] && ((!serve_gpus)); then
    IFS=, read -ra patterns <<<"${PCAM_GPU_PARTITIONS:-gpu_*}"
    for pattern in "${patterns[@]}"; do
        # shellcheck disable=SC2053  # a glob pattern on purpose
        if [[ -n $pattern && $partition == $pattern ]]; then
            die "serve: '$partition' is a GPU partition and a serve job asks for no GPU (the model serves on CPU cores). Choose a CPU partition: -p PARTITION (Snellius: rome or genoa), or PCAM_SERVE_PARTITION=PARTITION in your site file; or ask for a GPU: --gpus=1 or PCAM_SERVE_GPUS=1 (ONNX Runtime uses it only with its CUDA provider, onnxruntime-gpu)."
        fi
    done
fi
# The time-limit signal's lead from the limit (an option, SBATCH_TIMELIMIT, else the script's own).
if [[ -n ${PCAM_SIGNAL_LEAD:-} && -z ${SBATCH_SIGNAL:-} ]] && ((!have_signal)); then
    [[ -n $time_limit ]] || time_limit=$(sed -n 's/^#SBATCH --time=//p' "$script" | head -n 1)
    [[ -n $time_limit ]] || die "PCAM_SIGNAL_LEAD needs a time limit: give --time or SBATCH_TIMELIMIT."
    limit_s=$(seconds "$time_limit") # separate lines: a `die` in $(...) then stops this script
    lead=$(signal_lead "$limit_s" "$PCAM_SIGNAL_LEAD")
    export SBATCH_SIGNAL=B:USR1@$lead
    echo "submit.sh: the time-limit signal (SIGUSR1) comes ${lead} s before the ${time_limit} limit (PCAM_SIGNAL_LEAD=$PCAM_SIGNAL_LEAD)." >&2
fi
# Node-local NVMe for PCAM_STAGE_DATA=1 (Snellius: --constraint=scratch-node; $TMPDIR is on it).
if [[ $what != serve && ${PCAM_STAGE_DATA:-0} == 1 && -n ${PCAM_STAGE_CONSTRAINT:-} ]] && ((!have_constraint)) && [[ -z ${SBATCH_CONSTRAINT:-} ]]; then
    sbatch_opts+=("--constraint=$PCAM_STAGE_CONSTRAINT")
fi

export PCAM_COMMIT=${PCAM_COMMIT:-$(git -C "$repo" rev-parse HEAD)}
mkdir -p "$repo/logs"
cd "$repo"
jobid=$(sbatch --parsable "${sbatch_opts[@]}" "$script" "$@") || die "sbatch failed (see its message above)."
jobid=${jobid%%;*}
echo "$jobid"
if [[ $what == slides ]]; then
    # The cohort table once every task has ended, whatever their states (a failed slide fails its
    # task, and the table must still name it).
    cohort_opts=()
    for o in "${sbatch_opts[@]}"; do [[ $o == --array=* ]] || cohort_opts+=("$o"); done
    cohort=$(PCAM_SLIDES_COHORT=1 PCAM_SLIDES_ARRAY=$jobid sbatch --parsable "${cohort_opts[@]}" \
        --dependency="afterany:$jobid" --job-name=pcam-slides-cohort --output=logs/%x-%j.out \
        "$script" "$@") || die "sbatch of the cohort job failed (the array $jobid runs; its table: pcam slides LIST --out DIR --cohort-only)."
    cohort=${cohort%%;*}
    echo "$cohort"
    echo "submit.sh: the cohort table job $cohort runs after array $jobid: logs/pcam-slides-cohort-$cohort.out" >&2
fi
echo "submit.sh: submitted $what as job $jobid (commit ${PCAM_COMMIT:0:12}); log in $repo/logs/; follow with: squeue -j $jobid; afterwards: sacct -j $jobid" >&2
if [[ $what == serve ]]; then
    echo "submit.sh: once the server is up, the job's log has the SSH tunnel to run on your machine, the URL and the token file; stop it with: scancel $jobid" >&2
fi
