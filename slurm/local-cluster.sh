#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests and CI (and for trying the wrappers on a laptop).
#
#   slurm/local-cluster.sh install   apt-get install Debian's slurm-wlm + munge (root; idempotent)
#   slurm/local-cluster.sh start     write the config, start munged, slurmctld, slurmd; wait until idle
#   slurm/local-cluster.sh stop      stop the daemons by the PIDs in their pid files
#   slurm/local-cluster.sh status    print daemon PIDs and the node state (exit 1 if not running)
#   slurm/local-cluster.sh env       print `export SLURM_CONF=...` for `eval "$(... env)"`
#
# Everything (config, state, logs, pid files, fake GPU devices) lives under $PCAM_SLURM_DIR
# (default /tmp/pcam-slurm), munged's socket in /run/pcam-munge-<hash>; nothing is written to
# /etc/slurm. Client commands need
# SLURM_CONF=$PCAM_SLURM_DIR/etc/slurm.conf (see `env`).
#
# The cluster: ClusterName=ci, node `localhost` (CPUs=2, RealMemory=4000, two fake GPUs as GRES of
# type a100_1g.5gb, `gpu:a100_1g.5gb:2` as a site with MIG slices types them (PCAM_SLURM_GPU_TYPE;
# an untyped `--gpus=1` still gets one), backed by character devices 195:N, feature scratch-node as
# on Snellius' NVMe nodes), partitions `ci` (default), `gpu_a100`, `gpu_h100`, and the course's
# `thin_course` and `gpu_course` (so Snellius partition names work here), job records from `sacct -c`
# (jobcomp/filetxt). Daemons bind to 127.0.0.1 only (CommunicationParameters=NoCtldInAddrAny,
# NoInAddrAny); munged uses a private socket.
set -euo pipefail

SLURM_DIR=${PCAM_SLURM_DIR:-/tmp/pcam-slurm}
CTLD_PORT=${PCAM_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${PCAM_SLURM_SLURMD_PORT:-6818}
NODE_CPUS=${PCAM_SLURM_CPUS:-2}
NODE_MEM_MB=${PCAM_SLURM_MEM_MB:-4000}
START_TIMEOUT=${PCAM_SLURM_START_TIMEOUT:-30}
# The GPUs' gres type: the course's MIG slice (`--gpus=a100_1g.5gb:1` asks for it by name).
GPU_TYPE=${PCAM_SLURM_GPU_TYPE:-a100_1g.5gb}

ETC=$SLURM_DIR/etc
RUN=$SLURM_DIR/run
LOG=$SLURM_DIR/log
# munged runs as user munge, which may not traverse $PCAM_SLURM_DIR (e.g. under a 0700 temp dir),
# and job commands of any user must reach its socket: keep it in a 0755 directory of its own.
MUNGE=${PCAM_SLURM_MUNGE_DIR:-/run/pcam-munge-$(printf '%s' "$SLURM_DIR" | md5sum | cut -c1-8)}
DEV=$SLURM_DIR/dev
CONF=$ETC/slurm.conf

PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
BINARIES=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sbatch /usr/bin/sacct)

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh" # die, log, apt_install

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (slurmd runs jobs as their users; munged runs as user munge)."
}

installed() {
    local b
    for b in "${BINARIES[@]}"; do [[ -x $b ]] || return 1; done
}

cmd_install() {
    if installed; then
        log "Slurm and munge are already installed ($(/usr/sbin/slurmctld -V 2>/dev/null || echo '?'))."
        return 0
    fi
    need_root install
    command -v apt-get >/dev/null || die "apt-get not found: this script installs Debian's packages (${PACKAGES[*]}); install them with your package manager."
    mkdir -p "$(dirname "$SLURM_DIR")"
    log "installing ${PACKAGES[*]}..."
    # apt never starts the daemons here (no systemd / policy-rc.d); `start` does.
    apt_install "${PACKAGES[@]}"
    installed || die "packages installed but ${BINARIES[*]} are not all present."
    log "installed $(/usr/sbin/slurmctld -V)."
}

pid_of() { # pid_of NAME -> prints a live PID from $RUN/NAME.pid, or nothing
    local f=$RUN/$1.pid pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

write_config() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$DEV" "$SLURM_DIR/state" "$SLURM_DIR/spool"
    local i
    for i in 0 1; do
        local d=$DEV/nvidia$i
        if [[ -e $d && ! -c $d ]]; then rm -f "$d"; fi
        # Character devices with the NVIDIA major number: the GPU GRES plugin insists on devices.
        [[ -c $d ]] || mknod "$d" c 195 "$i"
    done
    cat >"$CONF.tmp" <<CONF
# Written by slurm/local-cluster.sh; regenerated on every start.
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (Slurm default 120 s).
AuthInfo=cred_expire=5,socket=$MUNGE/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MinJobAge=10
KillWait=10
SchedulerType=sched/backfill
# Re-evaluate pending jobs often (a requeued job becomes eligible after cred_expire).
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:$GPU_TYPE:2 Feature=scratch-node State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu_a100 Nodes=localhost MaxTime=INFINITE State=UP
PartitionName=gpu_h100 Nodes=localhost MaxTime=INFINITE State=UP
PartitionName=thin_course Nodes=localhost MaxTime=INFINITE State=UP
PartitionName=gpu_course Nodes=localhost MaxTime=INFINITE State=UP
CONF
    mv "$CONF.tmp" "$CONF"
    cat >"$ETC/gres.conf" <<CONF
AutoDetect=off
NodeName=localhost Name=gpu Type=$GPU_TYPE File=$DEV/nvidia[0-1]
CONF
}

start_munge() {
    if [[ -n $(pid_of munged) ]]; then return 0; fi
    mkdir -p "$MUNGE"
    chown munge:munge "$MUNGE"
    chmod 0755 "$MUNGE"
    local key=/etc/munge/munge.key
    [[ -s $key ]] || die "$key is missing: reinstall munge ('$0 install') or create one with 'mungekey -c' as user munge."
    rm -f "$MUNGE/munge.socket" "$MUNGE/munge.socket.lock"
    # munged refuses some paths (e.g. under world-writable /tmp) without --force; the socket dir is ours.
    runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE/munge.socket" --key-file="$key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
        || die "munged failed to start; see $MUNGE/munged.log"
    local i
    for i in $(seq 1 50); do
        [[ -S $MUNGE/munge.socket && -s $MUNGE/munged.pid ]] && break
        sleep 0.1
    done
    [[ -s $MUNGE/munged.pid ]] || die "munged wrote no pid file; see $MUNGE/munged.log"
    cp "$MUNGE/munged.pid" "$RUN/munged.pid"
}

node_state() { SLURM_CONF=$CONF sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

cmd_start() {
    need_root start
    installed || die "Slurm is not installed: run '$0 install' first."
    mkdir -p "$SLURM_DIR"
    if [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) && -n $(pid_of munged) ]]; then
        log "already running (SLURM_CONF=$CONF)."
        wait_idle
        return 0
    fi
    # A partial leftover (e.g. slurmd died): stop everything and start clean.
    cmd_stop >/dev/null 2>&1 || true
    write_config
    start_munge
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
            die "port $port is already in use (another slurmctld/slurmd?): stop it, or set PCAM_SLURM_CTLD_PORT / PCAM_SLURM_SLURMD_PORT."
        fi
    done
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed to start; see $LOG/slurmctld.log"
    /usr/sbin/slurmd -f "$CONF" -N localhost || die "slurmd failed to start; see $LOG/slurmd.log"
    wait_idle
    log "running: SLURM_CONF=$CONF (stop with '$0 stop')."
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated) return 0 ;;
            drain* | inval* | down*)
                # Left over from an earlier run (state survives restarts): return the node to service.
                SLURM_CONF=$CONF scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
                ;;
        esac
        sleep 0.5
    done
    die "node 'localhost' is not idle after ${START_TIMEOUT}s (state: '${state:-unknown}'); see $LOG/slurmctld.log and $LOG/slurmd.log"
}

stop_pid() { # stop_pid NAME
    local pid i
    pid=$(pid_of "$1")
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$1 (pid $pid) did not stop in 10 s; sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/$1.pid"
    log "stopped $1 (pid $pid)"
}

cmd_stop() {
    # slurmd first (it kills running jobs' steps), then the controller, then munge.
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    if [[ -d $MUNGE && -z ${PCAM_SLURM_MUNGE_DIR:-} ]]; then rm -rf "$MUNGE"; fi
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=1; fi
    done
    if ((rc == 0)); then
        echo "node localhost: $(node_state || echo unknown)"
        echo "SLURM_CONF=$CONF"
    fi
    return "$rc"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
