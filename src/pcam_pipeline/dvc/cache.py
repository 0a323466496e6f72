"""Where this clone's DVC cache and site cache live, and whether they are set up as DVC's
maintainers advise (`python -m pcam_pipeline.dvc.cache`; scripts/shared-cache.sh and every
Slurm job run it):

- the link type: the first of `cache.type` that works between the cache and the workspace,
  tried with a probe file; when it is not the first one configured, a message says which one
  DVC falls back to and what that costs (DVC itself falls back silently; a copy doubles the
  disk every output takes);
- the site cache (`core.site_cache_dir`, DVC's sqlite state of file hashes and links) on a
  network file system (NFS, GPFS, Lustre, CIFS, BeeGFS, ...): sqlite's locks are unreliable
  there (DVC issues 1918, 8176, 9298), so DVC's advice is a local or per-user disk.

It only warns: every finding is printed, the exit status is 0 (1 outside a DVC repository).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# File system types (the third field of /proc/mounts) whose byte-range locks sqlite cannot
# rely on, or that live on another machine.
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "gpfs",
        "lustre",
        "cifs",
        "smb3",
        "smbfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "panfs",
        "afs",
        "9p",
        "wekafs",
    }
)
FICLONE = 0x40049409  # ioctl: share a file's extents (a reflink) on btrfs, XFS, ...


@dataclass(frozen=True)
class Mount:
    point: str
    fs_type: str


def parse_mounts(text: str) -> list[Mount]:
    """/proc/mounts lines: device, mount point (octal escapes for spaces), type, ..."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].encode().decode("unicode_escape")
            mounts.append(Mount(point, fields[2]))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path` (the longest mount point above it; the last mounted wins)."""
    resolved = str(Path(path).resolve())
    best: Mount | None = None
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def site_cache_warning(site_cache_dir: Path, mounts: list[Mount]) -> str | None:
    mount = mount_of(site_cache_dir, mounts)
    if mount is None or mount.fs_type not in NETWORK_FS:
        return None
    return (
        f"core.site_cache_dir {site_cache_dir} is on a network file system ({mount.fs_type} at "
        f"{mount.point}): DVC keeps sqlite databases there, whose locks {mount.fs_type} does "
        "not guarantee (DVC issues 1918, 8176, 9298: 'database is locked', lost state). Fix: "
        "`dvc config --local core.site_cache_dir <a directory on a local disk>`, e.g. "
        "node-local scratch or /var/tmp/$USER/dvc-site; keep the object cache (cache.dir) on "
        "the shared file system"
    )


def _reflink(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())


LINKERS: dict[str, Callable[[Path, Path], object]] = {
    "reflink": _reflink,
    "hardlink": os.link,
    "symlink": os.symlink,
    "copy": shutil.copyfile,
}


def link_works(link_type: str, cache_dir: Path, workspace: Path) -> str | None:
    """None if `link_type` links a file of `cache_dir` into `workspace`; else why not."""
    with probe_file(cache_dir) as source:
        target = workspace / f".pcam-link-probe-{os.getpid()}"
        try:
            LINKERS[link_type](source, target)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        target.unlink()
        return None


@contextlib.contextmanager
def probe_file(directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".pcam-link-probe-", dir=directory)
    os.write(handle, b"probe")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink()


def link_report(types: list[str], cache_dir: Path, workspace: Path) -> tuple[str | None, str]:
    """(the link type DVC will use, a message): the message says why the first configured
    types fail and what the one used costs."""
    failures = []
    for link_type in types:
        why = link_works(link_type, cache_dir, workspace)
        if why is None:
            if not failures:
                return link_type, f"cache.type {link_type}: works from {cache_dir} to {workspace}"
            tried = "; ".join(failures)
            cost = (
                "every output is copied: it takes its size twice on disk, and DVC copies it "
                "into the cache after each stage"
                if link_type == "copy"
                else "outputs are links to read-only cache files"
            )
            return link_type, (
                f"cache.type falls back to {link_type} ({tried}): {cost}. Fix: keep the cache "
                "on the workspace's file system (hard links need one file system, or one GPFS "
                "fileset), or list a type that works there first"
            )
        failures.append(f"{link_type} not supported: {why}")
    return None, (
        f"no type of cache.type {','.join(types)} works from {cache_dir} to {workspace} "
        f"({'; '.join(failures)}): DVC will fail to check out. Fix: add copy to cache.type"
    )


def report(root: Path = Path("."), mounts_file: Path = Path("/proc/mounts")) -> list[str]:
    """Lines describing the cache set-up of the DVC repository at `root`; warnings first
    marked `warning:`."""
    from dvc.repo import Repo

    with Repo(os.fspath(root)) as repo:
        configured = repo.config["cache"].get("type") or ["reflink", "copy"]
        types = [configured] if isinstance(configured, str) else list(configured)
        cache_dir = Path(repo.cache.local.path)
        site_cache_dir = Path(repo.site_cache_dir)
        workspace = Path(repo.root_dir)
        shared = repo.config["cache"].get("shared")
    mounts = parse_mounts(mounts_file.read_text()) if mounts_file.exists() else []
    lines = []
    used, message = link_report(types, cache_dir, workspace)
    lines.append(message if used == types[0] else f"warning: {message}")
    for label, path in (("cache.dir", cache_dir), ("core.site_cache_dir", site_cache_dir)):
        mount = mount_of(path, mounts)
        where = f"{mount.fs_type} at {mount.point}" if mount else "unknown file system"
        lines.append(f"{label} {path} ({where})")
    if shared:
        lines.append(f"cache.shared {shared}")
    if warning := site_cache_warning(site_cache_dir, mounts):
        lines.append(f"warning: {warning}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from dvc.exceptions import NotDvcRepoError

    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(".")
    try:
        lines = report(root)
    except NotDvcRepoError:
        print(
            f"dvc cache: error: {root.resolve()} is not inside a DVC repository: cd into your clone"
        )
        return 1
    for line in lines:
        print(f"dvc cache: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
