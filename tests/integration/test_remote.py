"""The DVC remote on S3 and the shared group cache (issue 8), against a real S3 server.

A session-scoped moto server is started through scripts/s3-server.py on a free loopback port
(bucket created, public-read like an HTTP mirror, stopped at the end). Tests that need
authentication or that kill the server start their own instance the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.s3_fixtures import (
    ANY_CREDENTIALS,
    GUARD,
    REMOTE,
    S3_SERVER,
    SHARED_CACHE,
    S3Server,
    bare_origin,
    cache_objects,
    commit,
    copy_repo,
    env,
    fresh_clone,
    init_repo,
    make_raw_data,
    md5,
    mode_of,
    output,
    set_site_cache,
    sh,
    start_server,
    tree_digest,
)

BUCKET = "pcam-dvc-tests"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The shared S3 server: no authentication, objects readable anonymously (mirror tests)."""
    server = start_server(tmp_path_factory.mktemp("s3-state"), BUCKET, public_read=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server that checks signatures like a real store; its IAM user's keys in credentials()."""
    server = start_server(tmp_path_factory.mktemp("s3-auth-state"), "pcam-auth", require_auth=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A bucket prefix of this test's own, so tests never see each other's objects."""
    return re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")


@pytest.fixture
def data_repo(tmp_path: Path) -> Path:
    """A one-commit repository whose data/raw (small made files) is tracked by data.dvc."""
    repo = init_repo(tmp_path / "work")
    make_raw_data(repo / "data" / "raw")
    sh(["dvc", "add", "-q", "data/raw"], repo)
    # The project's file is data.dvc at the top (the name of a .dvc file is free in DVC).
    text = (repo / "data" / "raw.dvc").read_text().replace("path: raw", "path: data/raw")
    (repo / "data.dvc").write_text(text)
    (repo / "data" / "raw.dvc").unlink()
    commit(repo, "raw data")
    return repo


def add_remote(repo: Path, server: S3Server, prefix: str, *extra: str) -> None:
    url, endpoint = server.s3_url(prefix), server.endpoint
    sh([REMOTE, "add", "store", url, "--endpoint", endpoint, "--default", *extra], repo)


# --- the scripts ---------------------------------------------------------------------------------
def test_server_script_runs_on_loopback_and_stops_by_pid(tmp_path: Path):
    server = start_server(tmp_path / "state", "pcam-lifecycle")
    pid = server.pid()
    assert pid and Path(f"/proc/{pid}").exists()
    assert server.client().list_objects_v2(Bucket="pcam-lifecycle")["KeyCount"] == 0
    # listening on loopback only
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    port_hex = f"{server.port:04X}"
    local = [line.split()[1] for line in listening if line.split()[3] == "0A"]
    assert f"0100007F:{port_hex}" in local, "moto listens on 127.0.0.1"
    assert f"00000000:{port_hex}" not in local, "moto must not listen on all interfaces"
    # a second start with the same state refuses instead of starting a twin
    again = subprocess.run(
        [S3_SERVER, "start", "--port", str(server.port), "--state-dir", str(server.state_dir)],
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode != 0 and "already running" in again.stderr
    server.stop()
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"moto server PID {pid} still alive after stop")
    assert not (server.state_dir / "server.pid").exists()


def test_server_script_refuses_a_non_loopback_address(tmp_path: Path):
    result = subprocess.run(
        [S3_SERVER, "start", "--host", "0.0.0.0", "--state-dir", str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "not a loopback address" in result.stderr
    assert not (tmp_path / "server.pid").exists()


def test_remote_config_keeps_credentials_out_of_git(
    data_repo: Path, s3_auth: S3Server, prefix: str
):
    add_remote(data_repo, s3_auth, prefix)
    config = (data_repo / ".dvc" / "config").read_text()
    assert f"endpointurl = {s3_auth.endpoint}" in config
    assert "verify = true" in config

    keys = s3_auth.credentials()
    sh([REMOTE, "credentials", "store"], data_repo, credentials=keys)
    local = data_repo / ".dvc" / "config.local"
    assert keys["AWS_SECRET_ACCESS_KEY"] in local.read_text()
    assert mode_of(local) == 0o600
    assert keys["AWS_SECRET_ACCESS_KEY"] not in (data_repo / ".dvc" / "config").read_text()
    # git never sees config.local; the guard finds nothing in what git tracks
    commit(data_repo, "remote")
    tracked = sh(["git", "ls-files"], data_repo).stdout.split()
    assert ".dvc/config.local" not in tracked
    assert sh([sys.executable, GUARD], data_repo, check=False).returncode == 0

    # DVC takes the keys from config.local: no AWS variable in the environment at all
    pushed = sh(["dvc", "push"], data_repo)
    assert "5 files pushed" in pushed.stdout
    assert len(s3_auth.keys(prefix)) == 5
    shown = sh([REMOTE, "show"], data_repo).stdout
    assert "in .dvc/config.local (not committed)" in shown
    assert keys["AWS_SECRET_ACCESS_KEY"] not in shown

    # the same keys written to the committed config are refused by the guard
    sh(
        ["dvc", "remote", "modify", "store", "secret_access_key", keys["AWS_SECRET_ACCESS_KEY"]],
        data_repo,
    )
    guard = sh([sys.executable, GUARD, ".dvc/config"], data_repo, check=False)
    assert guard.returncode == 1
    assert ".dvc/config:" in guard.stderr and "secret_access_key" in guard.stderr
    assert "dvc remote modify --unset store secret_access_key" in guard.stderr
    assert keys["AWS_SECRET_ACCESS_KEY"] not in guard.stderr, "the guard must not echo secrets"


# --- publish and pull ----------------------------------------------------------------------------
def test_raw_data_push_then_fresh_clone_pulls_it_byte_for_byte(
    data_repo: Path, s3: S3Server, prefix: str, tmp_path: Path
):
    add_remote(data_repo, s3, prefix)
    commit(data_repo, "remote")
    origin = bare_origin(data_repo, tmp_path / "origin.git")
    pushed = sh(["dvc", "push", "data.dvc"], data_repo, credentials=ANY_CREDENTIALS)
    assert "5 files pushed" in pushed.stdout  # 4 files + the directory listing
    assert len(s3.keys(prefix)) == 5

    clone = fresh_clone(origin, tmp_path / "teammate")
    sh(["dvc", "pull"], clone, credentials=ANY_CREDENTIALS)
    assert tree_digest(clone / "data" / "raw") == tree_digest(data_repo / "data" / "raw")
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], clone).stdout
    cloud = sh(["dvc", "status", "--cloud"], clone, credentials=ANY_CREDENTIALS)
    assert "Cache and remote 'store' are in sync" in cloud.stdout
    # the raw data is in the clone's own cache now (not only in its workspace)
    assert len(cache_objects(clone / ".dvc" / "cache")) == 5


def test_http_mirror_pulls_without_credentials_and_refuses_push(
    data_repo: Path, s3: S3Server, prefix: str, tmp_path: Path
):
    add_remote(data_repo, s3, prefix)
    commit(data_repo, "remote")
    origin = bare_origin(data_repo, tmp_path / "origin.git")
    sh(["dvc", "push"], data_repo, credentials=ANY_CREDENTIALS)

    reader = fresh_clone(origin, tmp_path / "reader")
    sh([REMOTE, "mirror", "mirror", s3.http_url(prefix), "--default-local"], reader)
    assert "remote = mirror" in (reader / ".dvc" / "config.local").read_text()
    sh(["dvc", "pull"], reader)  # no AWS variables at all
    assert tree_digest(reader / "data" / "raw") == tree_digest(data_repo / "data" / "raw")

    before = sorted(s3.keys(prefix))
    (reader / "data" / "raw" / "new.txt").write_text("a change the reader tries to publish\n")
    sh(["dvc", "add", "-q", "data/raw"], reader)
    refused = sh(["dvc", "push"], reader, check=False)
    assert refused.returncode != 0
    assert "failed to push" in output(refused)
    assert sorted(s3.keys(prefix)) == before, "the read-only mirror took a write"


def test_corrupted_remote_object_is_detected_and_not_checked_out(
    data_repo: Path, s3: S3Server, prefix: str, tmp_path: Path
):
    add_remote(data_repo, s3, prefix)  # verify = true (scripts/remote.py default)
    commit(data_repo, "remote")
    origin = bare_origin(data_repo, tmp_path / "origin.git")
    sh(["dvc", "push"], data_repo, credentials=ANY_CREDENTIALS)
    victim = data_repo / "data" / "raw" / "part_1.h5"
    oid = md5(victim)
    key = f"{prefix}/files/md5/{oid[:2]}/{oid[2:]}"
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=b"bit rot on the object store\n")

    clone = fresh_clone(origin, tmp_path / "teammate")
    pulled = sh(["dvc", "pull", "-v"], clone, credentials=ANY_CREDENTIALS, check=False)
    assert pulled.returncode != 0
    log = output(pulled)
    assert f"corrupted cache file '{clone}/.dvc/cache/files/md5/{oid[:2]}/{oid[2:]}'" in log
    assert "Checkout failed for following targets" in log and "data/raw" in log
    assert not (clone / "data" / "raw").exists(), "corrupt data was checked out"
    assert f"{oid[:2]}/{oid[2:]}" not in cache_objects(clone / ".dvc" / "cache")

    # Why scripts/remote.py sets verify: without it DVC trusts the store and checks out rot.
    trusting = fresh_clone(origin, tmp_path / "trusting")
    sh(["dvc", "remote", "modify", "--local", "store", "verify", "false"], trusting)
    sh(["dvc", "pull"], trusting, credentials=ANY_CREDENTIALS)
    assert md5(trusting / "data" / "raw" / "part_1.h5") != oid

    # Repair. `dvc push` takes a directory whose listing (.dir object) is on the remote as
    # complete, so deleting the bad object alone changes nothing: delete the listing too.
    s3.client().delete_object(Bucket=BUCKET, Key=key)
    stale = sh(["dvc", "push"], data_repo, credentials=ANY_CREDENTIALS)
    assert "Everything is up to date" in output(stale)
    dir_md5 = yaml.safe_load((data_repo / "data.dvc").read_text())["outs"][0]["md5"]
    s3.client().delete_object(Bucket=BUCKET, Key=f"{prefix}/files/md5/{dir_md5[:2]}/{dir_md5[2:]}")
    repaired = sh(["dvc", "push"], data_repo, credentials=ANY_CREDENTIALS)
    assert "2 files pushed" in repaired.stdout
    sh(["dvc", "pull"], clone, credentials=ANY_CREDENTIALS)
    assert tree_digest(clone / "data" / "raw") == tree_digest(data_repo / "data" / "raw")


def test_push_with_wrong_credentials_fails_clearly_and_keeps_the_cache(
    data_repo: Path, s3_auth: S3Server, prefix: str
):
    add_remote(data_repo, s3_auth, prefix)
    cache = data_repo / ".dvc" / "cache"
    objects = cache_objects(cache)
    good = s3_auth.credentials()
    unknown_key = {"AWS_ACCESS_KEY_ID": "AKIA" + "Q" * 16, "AWS_SECRET_ACCESS_KEY": "x" * 40}
    wrong_secret = {**good, "AWS_SECRET_ACCESS_KEY": "y" * 40}

    for creds, code, words in [
        (unknown_key, "InvalidAccessKeyId", "does not know access key id"),
        (wrong_secret, "SignatureDoesNotMatch", "secret access key does not match"),
    ]:
        push = sh(["dvc", "push"], data_repo, credentials=creds, check=False)
        assert push.returncode != 0
        assert re.search(r"ERROR: .*(403|Forbidden)", output(push)), output(push)
        check = sh([REMOTE, "check", "store"], data_repo, credentials=creds, check=False)
        assert check.returncode == 1
        assert code in check.stderr and words in check.stderr
        assert "scripts/remote.py credentials store" in check.stderr
        assert creds["AWS_SECRET_ACCESS_KEY"] not in check.stderr
    missing = sh([REMOTE, "check", "store"], data_repo, check=False)
    assert "no credentials found" in missing.stderr

    # nothing reached the store, and the local cache is untouched, byte for byte
    assert s3_auth.keys(prefix) == []
    assert cache_objects(cache) == objects
    for name, content_md5 in objects.items():
        if not name.endswith(".dir"):
            assert name.replace("/", "") == content_md5, f"cache object {name} damaged"
    assert "up to date" in sh(["dvc", "status"], data_repo).stdout

    # the right keys: check passes (read and write), push completes
    checked = sh([REMOTE, "check", "store", "--write"], data_repo, credentials=good)
    assert "read OK" in checked.stdout and "write OK" in checked.stdout
    assert "5 files pushed" in sh(["dvc", "push"], data_repo, credentials=good).stdout


def test_server_stopped_mid_push_then_restarted_second_push_completes(tmp_path: Path, prefix: str):
    server = start_server(tmp_path / "state", "pcam-flaky")
    try:
        repo = init_repo(tmp_path / "work")
        many = repo / "data" / "many"
        many.mkdir(parents=True)
        for i in range(400):
            (many / f"f{i:04d}.bin").write_bytes(os.urandom(16_000))
        sh(["dvc", "add", "-q", "data/many"], repo)
        add_remote(repo, server, prefix)
        commit(repo, "many small files")
        origin = bare_origin(repo, tmp_path / "origin.git")

        # One transfer at a time, few retries: the push is still running when the server dies.
        first = subprocess.Popen(
            ["dvc", "push", "-j", "1"],
            cwd=repo,
            env=env(ANY_CREDENTIALS, AWS_MAX_ATTEMPTS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while len(server.keys(prefix)) < 20:
                assert first.poll() is None, "push ended before the server could be stopped"
                assert time.monotonic() < deadline, "push made no progress"
                time.sleep(0.02)
            server.stop()
            assert first.poll() is None, "the push finished before the server went away"
            # Down for longer than s3fs's retries of one object (5 tries, ~2 s of backoff), so
            # at least that object fails and DVC does not record the directory as pushed.
            time.sleep(3.0)
            server.start()  # moto keeps data in memory: an empty bucket again
            first_out, _ = first.communicate(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
        assert first.returncode != 0, first_out[-2000:]
        assert "failed to push data to the cloud" in first_out, first_out[-2000:]
        # What the first push uploaded before the stop is gone; DVC must find that out itself.
        assert len(server.keys(prefix)) < 401
        cloud = sh(["dvc", "status", "--cloud"], repo, credentials=ANY_CREDENTIALS)
        assert "deleted:" in cloud.stdout or "new:" in cloud.stdout, first_out[-2000:]

        second = sh(["dvc", "push"], repo, credentials=ANY_CREDENTIALS)
        assert re.search(r"\d+ files? pushed", second.stdout), second.stdout
        assert len(server.keys(prefix)) == 401  # 400 files + the directory listing
        clone = fresh_clone(origin, tmp_path / "teammate")
        sh(["dvc", "pull"], clone, credentials=ANY_CREDENTIALS)
        assert tree_digest(clone / "data" / "many") == tree_digest(many)
    finally:
        server.stop()


# --- shared cache and locks ----------------------------------------------------------------------
def shared_group() -> str:
    """A group other than the user's primary one, so that group ownership is really checked."""
    import grp

    mine = os.getgid()
    for name in ("users", "staff"):
        try:
            if grp.getgrnam(name).gr_gid != mine:
                return name
        except KeyError:
            continue
    return grp.getgrgid(mine).gr_name


def assert_group_shared(cache: Path, group: str) -> int:
    """Every directory: group `group`, group-writable, setgid; every file: group `group`,
    group-readable. Returns the number of files checked."""
    import grp

    gid = grp.getgrnam(group).gr_gid
    files = 0
    for path in [cache, *cache.rglob("*")]:
        st = path.lstat()
        assert st.st_gid == gid, f"{path} has group {st.st_gid}, not {group}"
        if path.is_dir():
            assert mode_of(path) & 0o2070 == 0o2070, f"{path}: {oct(mode_of(path))}"
        else:
            assert mode_of(path) & 0o040, f"{path}: {oct(mode_of(path))}"
            files += 1
    return files


def test_shared_cache_script_sets_group_setgid_and_local_config(tmp_path: Path):
    group = shared_group()
    repo = init_repo(tmp_path / "clone")
    cache = tmp_path / "gpfs" / "pcam-cache"
    site = tmp_path / "site"
    setup = sh([SHARED_CACHE, cache, group, "--site-cache-dir", site], repo)
    assert mode_of(cache) == 0o2775
    assert "dvc cache: cache.type symlink: works" in setup.stdout
    local = sh(["dvc", "config", "--local", "--list"], repo).stdout.splitlines()
    for line in [
        f"cache.dir={cache}",
        "cache.shared=group",
        "cache.type=symlink,hardlink,copy",
        f"core.site_cache_dir={site}",
    ]:
        assert line in local
    assert sh(["git", "status", "--porcelain", ".dvc"], repo).stdout == ""

    make_raw_data(repo / "data" / "raw")
    sh(["dvc", "add", "-q", "data/raw"], repo)
    assert assert_group_shared(cache, group) == 5
    sh(["dvc", "checkout", "--relink"], repo)
    assert (repo / "data" / "raw" / "part_0.h5").is_symlink()

    bad = sh([SHARED_CACHE, tmp_path / "other", "no-such-group-pcam"], repo, check=False)
    assert bad.returncode != 0 and "group 'no-such-group-pcam' does not exist" in bad.stderr


def slow_stage_repo(path: Path, *config: str) -> Path:
    repo = init_repo(path)
    stage = {
        # `fast` (not a dependency) lets the later runs finish at once
        "cmd": "test -e fast || sleep 60; echo done > out.txt",
        "outs": ["out.txt"],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": stage}}))
    if config:
        sh(["dvc", "config", *config], repo)
    commit(repo, "slow stage")
    return repo


def killed_repro(repo: Path) -> None:
    """`dvc repro` killed with SIGKILL while its stage runs, as Slurm does at the time limit."""
    job = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    deadline = time.monotonic() + 60
    while not (rwlock.exists() and 'out.txt"' in rwlock.read_text()):
        assert job.poll() is None, "dvc repro ended before it could be killed"
        assert time.monotonic() < deadline, "dvc repro never took its locks"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def test_killed_job_default_lock_needs_no_cleanup(tmp_path: Path):
    """The README: .dvc/tmp/lock is an OS lock released with the process; DVC itself drops
    rwlock entries of dead PIDs (same host)."""
    repo = slow_stage_repo(tmp_path / "clone")
    killed_repro(repo)
    lock_info = json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text())
    assert lock_info["write"], "the killed job left its write lock behind"
    (repo / "fast").touch()
    rerun = sh(["dvc", "repro"], repo)
    assert "had been killed. Auto removed it from the lock file" in output(rerun)
    assert (repo / "out.txt").read_text() == "done\n"


HOLD_REPO_LOCK_THEN_DIE = """
import os, signal, sys
from dvc.repo import Repo
repo = Repo(sys.argv[1])
repo.lock.lock()  # what dvc holds while it hashes, saves or checks out outputs
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("hardlink_lock", [False, True])
def test_killed_while_holding_the_repo_lock(tmp_path: Path, hardlink_lock: bool):
    """The README: DVC's default .dvc/tmp/lock is an OS lock that dies with the process; with
    core.hardlink_lock (NFS) a killed job leaves it held until someone removes the file.
    (While the stage command itself runs, DVC does not hold this lock.)"""
    repo = slow_stage_repo(tmp_path / "clone")
    if hardlink_lock:
        sh(["dvc", "config", "core.hardlink_lock", "true"], repo)
    died = subprocess.run(
        [sys.executable, "-c", HOLD_REPO_LOCK_THEN_DIE, str(repo)], env=env(), check=False
    )
    assert died.returncode == -signal.SIGKILL
    assert (repo / ".dvc" / "tmp" / "lock").exists()
    status = sh(["dvc", "status"], repo, check=False)
    if not hardlink_lock:
        assert status.returncode == 0, output(status)
        return
    assert status.returncode != 0
    assert "Unable to acquire lock" in output(status)
    (repo / ".dvc" / "tmp" / "lock").unlink()
    assert sh(["dvc", "status"], repo).returncode == 0


# --- the pipeline's outputs (heavy: they need one real `dvc repro`) -----------------------------
# What DVC caches (and so pushes and pulls); the rest of the outputs are committed to git.
CACHED_OUTPUTS = ["data/pcam", "data/processed", "models/best.pt", "models/last.pt", "data/raw"]
STAGES = [
    "fetch", "validate", "preprocess", "train", "evaluate", "export", "export_bench", "benchmark",
    "drift_reference",
]  # fmt: skip


@dataclass
class Published:
    repo: Path  # the publisher's clone, with every output in its workspace and cache
    origin: Path  # the shared git remote (a bare repository)


@pytest.fixture(scope="module")
def published(
    pipeline_repo: Path, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    """The README's publish flow on a copy of the default pipeline run: the raw data (made
    stand-in files, as after `pcam download`) committed to data.dvc, the results committed to
    git and pushed to a bare origin, and `dvc push` of everything to the S3 remote."""
    base = tmp_path_factory.mktemp("published")
    repo = copy_repo(pipeline_repo, base / "publisher")
    (repo / "repro.log").unlink(missing_ok=True)
    make_raw_data(repo / "data" / "raw")
    sh(["dvc", "commit", "-f", "data.dvc"], repo)
    add_remote(repo, s3, "published")
    commit(repo, "results of dvc repro, raw data, remote")
    origin = bare_origin(repo, base / "origin.git")
    pushed = sh(["dvc", "push"], repo, credentials=ANY_CREDENTIALS)
    assert re.search(r"\d+ files pushed", pushed.stdout), pushed.stdout
    status = sh(["dvc", "status", "--cloud"], repo, credentials=ANY_CREDENTIALS)
    assert "Cache and remote 'store' are in sync" in status.stdout
    return Published(repo, origin)


def outputs_digest(repo: Path) -> dict[str, dict[str, str]]:
    return {path: tree_digest(repo / path) for path in CACHED_OUTPUTS}


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", log)


@pytest.mark.heavy
def test_pipeline_outputs_pull_byte_for_byte_and_repro_runs_nothing(
    published: Published, tmp_path: Path
):
    clone = fresh_clone(published.origin, tmp_path / "teammate")
    sh(["dvc", "pull"], clone, credentials=ANY_CREDENTIALS)
    assert outputs_digest(clone) == outputs_digest(published.repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], clone).stdout
    repro = output(sh(["dvc", "repro"], clone))
    assert ran_stages(repro) == [], repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro
    assert sh(["git", "status", "--porcelain"], clone).stdout == ""


@pytest.mark.heavy
def test_repro_pull_fetches_only_stage_outputs(published: Published, tmp_path: Path):
    clone = fresh_clone(published.origin, tmp_path / "teammate")
    repro = output(sh(["dvc", "repro", "--pull"], clone, credentials=ANY_CREDENTIALS))
    assert ran_stages(repro) == [], repro
    assert "Pulling data for stage: 'train'" in repro
    expected = outputs_digest(published.repo)
    for path in CACHED_OUTPUTS[:-1]:
        assert tree_digest(clone / path) == expected[path], path
    assert not (clone / "data" / "raw").exists(), "the pipeline does not need the raw data"
    assert "Data and pipelines are up to date" in sh(["dvc", "status", "dvc.yaml"], clone).stdout


@pytest.mark.heavy
def test_repro_pull_allow_missing_downloads_only_what_a_changed_stage_needs(
    published: Published, tmp_path: Path
):
    clone = fresh_clone(published.origin, tmp_path / "node")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["n_slices"] += 1  # a parameter only the evaluate stage reads
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = output(
        sh(["dvc", "repro", "--pull", "--allow-missing"], clone, credentials=ANY_CREDENTIALS)
    )
    # evaluate's metrics changed (the worst slice): the stages that read reports/metrics.json
    # (the model card's, the exported model's threshold) follow; nothing upstream runs.
    assert ran_stages(repro) == ["evaluate", "export", "export_bench"], repro
    expected = outputs_digest(published.repo)
    assert tree_digest(clone / "models" / "best.pt") == expected["models/best.pt"]
    assert tree_digest(clone / "data" / "processed") == expected["data/processed"]
    for never_needed in ["data/pcam", "data/raw", "models/last.pt"]:
        assert not (clone / never_needed).exists(), f"{never_needed} was downloaded"


@pytest.mark.heavy
def test_experiment_pushed_from_one_clone_is_pulled_by_another(
    published: Published, tmp_path: Path
):
    alice = fresh_clone(published.origin, tmp_path / "alice")
    sh(["dvc", "pull"], alice, credentials=ANY_CREDENTIALS)
    sh(
        ["dvc", "exp", "run", "-n", "lr-3e-4", "-S", "train.lr=0.0003", "-S", "train.epochs=1"],
        alice,
    )
    alice_metrics = json.loads((alice / "reports" / "metrics.json").read_text())
    baseline = json.loads((published.repo / "reports" / "metrics.json").read_text())
    assert alice_metrics["test"]["auroc"] != baseline["test"]["auroc"]
    pushed = sh(["dvc", "exp", "push", "origin", "lr-3e-4"], alice, credentials=ANY_CREDENTIALS)
    assert "Pushed experiment lr-3e-4" in output(pushed)

    bob = fresh_clone(published.origin, tmp_path / "bob")
    assert "lr-3e-4" not in sh(["dvc", "exp", "list"], bob).stdout
    sh(["dvc", "exp", "pull", "origin", "lr-3e-4"], bob, credentials=ANY_CREDENTIALS)
    assert "lr-3e-4" in sh(["dvc", "exp", "list"], bob).stdout
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], bob).stdout)
    runs = {
        rev["name"]: rev["data"]
        for row in shown
        for exp in row.get("experiments") or []
        for rev in exp["revs"]
    }
    bob_view = runs["lr-3e-4"]["metrics"]["reports/metrics.json"]["data"]
    assert bob_view["test"] == alice_metrics["test"]
    # the experiment's model came along (exp push sends the cache too)
    sh(["dvc", "exp", "apply", "lr-3e-4"], bob)
    sh(["dvc", "checkout"], bob)
    assert md5(bob / "models" / "best.pt") == md5(alice / "models" / "best.pt")


TINY_PARAMS = {
    "fetch": {"sizes": {"train": 128, "valid": 64, "test": 64}},
    "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "cnn": {"channels": [8, 16]}},
    # 64 test patches: one pair ranked the other way moves the AUROC by 1/1024
    "export": {"int8": {"max_auroc_drop": 0.05}},
    "export_bench": {"batch_sizes": [8], "rounds": 1},
    "benchmark": {
        "batch_sizes": [1, 8],
        "devices": ["cpu"],
        "precisions": ["fp32"],
        "warmup_iters": 1,
        "timed_iters": 1,
        "latency_iters": 2,
        "loader_patches": 64,
        "baseline_patches": 8,
    },
}


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        is_dict = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if is_dict else value
    return merged


@pytest.mark.heavy
def test_two_clones_share_one_cache_without_recomputing(tmp_path: Path):
    """Two teammates' clones on one group cache (scripts/shared-cache.sh): the second gets the
    first's results from the cache, with no stage run and nothing added to the cache."""
    from tests.integration.conftest import copy_project

    seed = copy_project(tmp_path / "seed")
    shutil.rmtree(seed / ".dvc" / "site", ignore_errors=True)
    set_site_cache(seed)
    params = yaml.safe_load((seed / "params.yaml").read_text())
    (seed / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY_PARAMS)))
    commit(seed, "small params: this test is about the cache, not the model")
    origin = bare_origin(seed, tmp_path / "origin.git")
    group = shared_group()
    cache = tmp_path / "gpfs" / "group-cache"

    first = fresh_clone(origin, tmp_path / "first")
    sh([SHARED_CACHE, cache, group, "--site-cache-dir", tmp_path / "site-first"], first)
    run1 = output(sh(["dvc", "repro"], first))
    assert ran_stages(run1) == STAGES, run1
    commit(first, "dvc.lock of the first run")
    sh(["git", "push", "-q", "origin", "main"], first)
    objects = cache_objects(cache)

    second = fresh_clone(origin, tmp_path / "second")
    sh([SHARED_CACHE, cache, group, "--site-cache-dir", tmp_path / "site-second"], second)
    checkout = output(sh(["dvc", "checkout", "dvc.yaml"], second))
    run2 = output(sh(["dvc", "repro"], second))
    assert ran_stages(run2) == [], run2
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in run2
    assert cache_objects(cache) == objects, "the second clone added to the cache"
    assert not (second / ".dvc" / "cache").exists()
    for path in ["data/pcam", "data/processed", "models/best.pt"]:
        assert tree_digest(second / path) == tree_digest(first / path), path
    # links into the shared cache, not copies
    best = second / "models" / "best.pt"
    assert best.is_symlink() and Path(os.readlink(best)).is_relative_to(cache), checkout
    assert assert_group_shared(cache, group) >= len(objects)
