"""dvc_cache: the link type DVC will use, and the site cache's file system."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pcam_pipeline.dvc.cache import link_report, mount_of, parse_mounts, report, site_cache_warning

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
gpfs0 /gpfs gpfs rw 0 0
server:/export/home /home nfs4 rw,vers=4.2 0 0
/dev/nvme0n1 /scratch-node xfs rw 0 0
/dev/sdb /home/local\\040disk ext4 rw 0 0
"""
DVC = str(Path(sys.executable).parent / "dvc")


def test_mount_of_takes_the_longest_mount_point_above_the_path():
    mounts = parse_mounts(MOUNTS)
    assert mount_of(Path("/gpfs/projects/0/x/dvc-cache"), mounts).fs_type == "gpfs"
    assert mount_of(Path("/home/me/.cache/site"), mounts).fs_type == "nfs4"
    assert mount_of(Path("/home/local disk/site"), mounts).fs_type == "ext4"
    assert mount_of(Path("/gpfsx/not-gpfs"), mounts).point == "/"
    assert mount_of(Path("/scratch-node"), mounts).fs_type == "xfs"


@pytest.mark.parametrize(
    ("site", "warned"),
    [
        ("/gpfs/projects/0/p/dvc-site-cache", "gpfs"),
        ("/home/me/.cache/pcam-dvc-site", "nfs4"),
        ("/scratch-node/me/dvc-site", None),
        ("/var/tmp/me/dvc-site", None),
    ],
)
def test_a_site_cache_on_a_network_file_system_is_warned_about(site: str, warned: str | None):
    warning = site_cache_warning(Path(site), parse_mounts(MOUNTS))
    if warned is None:
        assert warning is None
    else:
        assert f"on a network file system ({warned}" in warning
        assert "core.site_cache_dir" in warning and "local disk" in warning


def test_hardlinks_work_within_one_file_system(tmp_path: Path):
    used, message = link_report(["hardlink", "symlink", "copy"], tmp_path / "c", tmp_path)
    assert used == "hardlink" and "works" in message


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="needs /dev/shm (tmpfs) for a second file system"
)
def test_an_unsupported_link_type_falls_back_with_a_message(tmp_path: Path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the test's tmp dir here")
        used, message = link_report(["reflink", "hardlink", "copy"], Path(other), tmp_path)
        assert used == "copy"
        assert "falls back to copy" in message
        assert "hardlink not supported: Invalid cross-device link" in message
        used, message = link_report(["hardlink"], Path(other), tmp_path)
        assert used is None and "add copy to cache.type" in message


def test_report_of_a_dvc_repository_names_the_link_type_and_warns(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for args in (
        ["init", "-q"],
        ["config", "cache.type", "hardlink,symlink,copy"],
        ["config", "--local", "core.site_cache_dir", str(tmp_path / "site")],
    ):
        subprocess.run([DVC, *args], cwd=repo, env=env, check=True)
    # /proc/mounts as a cluster node would have it: the test's tmp dir on NFS.
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/x {tmp_path} nfs rw 0 0\n")
    lines = report(repo, mounts)
    assert lines[0].startswith("cache.type hardlink: works")
    assert lines[-1].startswith(f"warning: core.site_cache_dir {tmp_path / 'site'}")
