#!/usr/bin/env bash
# Point this clone at a DVC cache shared by a Unix group (e.g. on GPFS on Snellius).
#
#   scripts/shared-cache.sh DIR [GROUP] [--site-cache-dir PATH] [--no-config]
#
# - Creates DIR (if needed) owned by GROUP (default: your primary group) with group write and
#   setgid (drwxrwsr-x): every member can add objects, and all of them belong to GROUP. (DVC keeps
#   the objects themselves read-only, mode 444; with cache.shared group it makes its directories
#   2775 whatever the umask.)
#   If DIR already exists and belongs to someone else, checks that it is set up that way.
# - Writes into .dvc/config.local of the clone you are in (never committed):
#     cache.dir = DIR, cache.shared = group, cache.type = symlink,hardlink,copy,
#     core.site_cache_dir = PATH (default ${XDG_CACHE_HOME:-$HOME/.cache}/pcam-dvc-site, must be
#     writable by you; DVC keeps its sqlite hash/link state there instead of /var/tmp/dvc: a
#     local or per-user disk, never NFS/GPFS/Lustre, whose locks sqlite cannot trust).
#   --no-config only prepares DIR.
#   Then `python -m pcam_pipeline.dvc.cache` reports the link type that works between DIR and
#   this clone (hard links need one file system: on GPFS one fileset) and warns when PATH is on
#   a network file system.
# Run it once per clone; every member runs it in their own clone with the same DIR and GROUP.
# Symlinks first, unlike the repository's own cache (hardlink,symlink,copy): a hard link into DIR
# keeps the file's owner and primary group (not DIR's setgid group: group quota, shared gc), and
# other members cannot hard-link an object they do not own (fs.protected_hardlinks). So DVC
# copies each new output into DIR once and the workspace holds symlinks to read-only cache
# files: run `dvc unprotect PATH` before editing a tracked file in place.
#
# Stale locks after a killed job (Slurm timeout, scancel, OOM) are per clone, not in DIR:
#   .dvc/tmp/rwlock  entries of dead PIDs on the same host are dropped by DVC itself; if DVC says
#                    "is busy, it is being blocked by (PID N)" and no dvc runs in this clone
#                    (check squeue / ps on the node that ran it), remove .dvc/tmp/rwlock.
#   .dvc/tmp/lock    with the default lock it is released when the process dies; only with
#                    core.hardlink_lock true (NFS) a killed job leaves it held for good ("Unable to
#                    acquire lock"): when no dvc runs in this clone, remove .dvc/tmp/lock.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cache_dir=""
group=""
site_cache_dir="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/pcam-dvc-site"
configure=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --site-cache-dir) site_cache_dir="${2:?--site-cache-dir needs a path}"; shift 2 ;;
        --no-config) configure=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see: scripts/shared-cache.sh --help)" ;;
        *)
            if [[ -z "$cache_dir" ]]; then cache_dir="$1"
            elif [[ -z "$group" ]]; then group="$1"
            else die "too many arguments: '$1' (usage: scripts/shared-cache.sh DIR [GROUP])"
            fi
            shift ;;
    esac
done
[[ -n "$cache_dir" ]] || { usage >&2; exit 2; }
group="${group:-$(id -gn)}"

getent group "$group" >/dev/null \
    || die "group '$group' does not exist: use one of yours ('id -Gn' lists them: $(id -Gn))"
if [[ "$(id -u)" != 0 ]] && ! id -Gn | tr ' ' '\n' | grep -qx -- "$group"; then
    die "you are not a member of group '$group' (yours: $(id -Gn)): ask your admin, or pick one of yours"
fi

mkdir -p "$cache_dir"
cache_dir="$(cd "$cache_dir" && pwd -P)"
me="$(id -u)"
owner="$(stat -c %u "$cache_dir")"

if [[ "$owner" == "$me" || "$me" == 0 ]]; then
    chgrp "$group" "$cache_dir"
    chmod u+rwx,g+rwxs,o+rx "$cache_dir"
    # The layout DVC 3 uses; pre-created so that the first writer's umask cannot narrow it.
    for sub in files files/md5 runs; do
        mkdir -p "$cache_dir/$sub"
    done
    # Anything already in DIR that we own (e.g. a cache moved here) gets the same treatment.
    find "$cache_dir" -user "$me" \( ! -group "$group" \) -exec chgrp "$group" {} +
    find "$cache_dir" -user "$me" -type d \( ! -perm -2070 \) -exec chmod g+rwxs {} +
    find "$cache_dir" -user "$me" -type f \( ! -perm -040 \) -exec chmod g+r {} +
else
    actual_group="$(stat -c %G "$cache_dir")"
    perms="$(stat -c %A "$cache_dir")"
    [[ "$actual_group" == "$group" && "${perms:5:1}" == "w" && "${perms:6:1}" == "s" ]] \
        || die "$cache_dir belongs to $(stat -c %U "$cache_dir"):$actual_group with $perms, not \
group '$group' with group write + setgid: ask its owner to run \
'scripts/shared-cache.sh $cache_dir $group --no-config' (or chgrp $group + chmod 2775 it)"
fi
[[ -w "$cache_dir" ]] || die "$cache_dir is not writable for you: check the group permissions"

echo "shared cache ready: $cache_dir ($(stat -c '%A %G' "$cache_dir"))"
(( configure )) || exit 0

dvc_bin="$(project_dvc)"
[[ -n "$dvc_bin" && -x "$dvc_bin" ]] || die "dvc not found: run 'make setup' first"
root="$("$dvc_bin" root 2>/dev/null)" \
    || die "not inside a DVC repository ($(pwd)): cd into your clone, then run this again"
cd "$root"

mkdir -p "$site_cache_dir"
[[ -w "$site_cache_dir" ]] \
    || die "--site-cache-dir $site_cache_dir is not writable: pick a directory of your own"
site_cache_dir="$(cd "$site_cache_dir" && pwd -P)"

"$dvc_bin" cache dir --local "$cache_dir"
"$dvc_bin" config --local cache.shared group
"$dvc_bin" config --local cache.type "symlink,hardlink,copy"
"$dvc_bin" config --local core.site_cache_dir "$site_cache_dir"
echo "configured $(pwd)/.dvc/config.local:"
"$dvc_bin" config --local --list | grep -E '^(cache|core)\.' | sed 's/^/    /'
"$(project_python)" -m pcam_pipeline.dvc.cache
echo "next: 'dvc checkout dvc.yaml' links the pipeline's outputs the shared cache already has"
