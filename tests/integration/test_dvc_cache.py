"""The repository's DVC cache configuration (.dvc/config: cache.type hardlink,symlink,copy) on
the data stages, under real `dvc repro` with `fetch.source: path`: DVC hashes none of the data
(fetch and preprocess tell it the md5s they computed), outputs are hard links of read-only
cache objects (no byte copied), a stage re-run after a change leaves the cached copy of its
previous output intact, and `dvc checkout` and `dvc gc` behave."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pcam_pipeline.data.pcam import all_file_names
from pcam_pipeline.perf.repro_full import make_repo
from tests.conftest import REPO_ROOT
from tests.integration.conftest import run
from tests.pcam_files import make_pcam_dir

pytestmark = pytest.mark.heavy


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_object(repo: Path, md5: str) -> Path:
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def locked_files(repo: Path, stage: str, out: str) -> dict[str, str]:
    """relpath -> md5 of every file of directory output `out` of `stage`, from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    entry = next(o for o in lock["stages"][stage]["outs"] if o["path"] == out)
    listing = json.loads(cache_object(repo, entry["md5"]).read_text())
    return {item["relpath"]: item["md5"] for item in listing}


def assert_linked_from_cache(
    repo: Path, stage: str, out: str, skip: frozenset[str] = frozenset()
) -> None:
    """Every file of `out` is its cache object, read-only, with its locked md5; files whose md5
    is in `skip` need only the md5 (DVC does not relink a file rewritten with the same bytes)."""
    for relpath, md5 in locked_files(repo, stage, out).items():
        assert md5_of(repo / out / relpath) == md5
        if md5 in skip:
            continue
        status = (repo / out / relpath).stat()
        assert status.st_ino == cache_object(repo, md5).stat().st_ino, f"{out}/{relpath} copied"
        assert status.st_mode & 0o222 == 0, f"{out}/{relpath} not protected read-only"


def corrupt_objects(repo: Path) -> list[str]:
    """Cache files whose content no longer has the md5 they are named by."""
    bad = []
    for path in (repo / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        if not path.name.endswith(".dir") and md5_of(path) != path.parent.name + path.name:
            bad.append(str(path))
    return bad


# Run by every `dvc` process of a test that puts its directory on PYTHONPATH: each file DVC
# itself hashes (reads to compute an md5, rather than taking it from its state) is logged.
HASH_SPY = """
import os, sys
if os.path.basename(sys.argv[0]) == "dvc":
    import dvc_data.hashfile.hash as _hash
    _real = _hash._hash_file
    def _logged(path, *args, **kwargs):
        with open(os.environ["PCAM_TEST_HASHED"], "a") as log:
            log.write(str(path) + "\\n")
        return _real(path, *args, **kwargs)
    _hash._hash_file = _logged
"""


def hashed_by_dvc(spy: Path, repo: Path, *args: str) -> list[str]:
    """Run `dvc ARGS` in `repo`; the files (relative to `repo`) DVC read to hash them."""
    log = spy / "hashed.txt"
    log.unlink(missing_ok=True)
    run(["dvc", *args], repo, PYTHONPATH=str(spy), PCAM_TEST_HASHED=str(log))
    lines = log.read_text().splitlines() if log.exists() else []
    return [os.path.relpath(line, repo) for line in lines]


@pytest.fixture
def data_repo(tmp_path: Path, make_params) -> tuple[Path, Path]:
    source = make_pcam_dir(tmp_path / "shared-copy")
    checksums = tmp_path / "sums.md5"
    checksums.write_text("".join(f"{md5_of(source / n)}  {n}\n" for n in all_file_names()))
    repo = tmp_path / "repo"
    config = (REPO_ROOT / ".dvc" / "config").read_text()
    make_repo(repo, make_params().as_dict(), source, str(checksums), config, REPO_ROOT)
    return repo, source


def test_links_protected_outputs_checkout_and_gc(data_repo: tuple[Path, Path], tmp_path: Path):
    repo, source = data_repo
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(HASH_SPY)
    hashed = hashed_by_dvc(spy, repo, "repro", "preprocess")
    # No byte of the data hashed twice: fetch's md5s of data/pcam (from its check against
    # fetch.checksums) and preprocess's of data/processed (computed as written) are DVC's.
    assert hashed, "the spy saw DVC hash nothing at all: it is not working"
    data = [path for path in hashed if path.startswith("data/") or path.endswith(".h5")]
    assert data == ["data/processed/stats.json"], hashed
    assert_linked_from_cache(repo, "fetch", "data/pcam")
    assert_linked_from_cache(repo, "preprocess", "data/processed")
    for name in all_file_names():  # the shared copy, data/pcam and the cache: one inode
        assert (repo / "data" / "pcam" / name).stat().st_ino == (source / name).stat().st_ino
    before = {name: (repo / name).read_bytes() for name in ("dvc.lock", "params.yaml")}
    old_processed = locked_files(repo, "preprocess", "data/processed")

    # A change that reruns preprocess: it writes new files beside the protected links and
    # renames them into place, never into the cached copy of the previous output.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"].update(layout="chunked", chunk_patches=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "preprocess"], repo)
    new_processed = locked_files(repo, "preprocess", "data/processed")
    assert new_processed != old_processed
    assert corrupt_objects(repo) == []
    # stats.json came out the same: DVC keeps the stage's new file, a copy, until a relink
    same = frozenset(old_processed.values()) & frozenset(new_processed.values())
    assert same
    assert_linked_from_cache(repo, "preprocess", "data/processed", skip=same)

    # Back to the previous lock: checkout links the previous output from the cache again.
    for name, content in before.items():
        (repo / name).write_bytes(content)
    run(["dvc", "checkout"], repo)
    assert_linked_from_cache(repo, "preprocess", "data/processed", skip=same)
    run(["dvc", "checkout", "--relink"], repo)
    assert_linked_from_cache(repo, "preprocess", "data/processed")
    assert "up to date" in run(["dvc", "status"], repo).stdout

    # gc keeps what the workspace uses, drops the rest, and leaves the links whole.
    run(["dvc", "gc", "--workspace", "--force"], repo)
    gone = set(new_processed.values()) - set(old_processed.values())
    assert gone and not any(cache_object(repo, md5).exists() for md5 in gone)
    assert_linked_from_cache(repo, "preprocess", "data/processed")
    assert_linked_from_cache(repo, "fetch", "data/pcam")
    assert corrupt_objects(repo) == []
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_the_cache_check_names_the_link_type_used(data_repo: tuple[Path, Path]):
    repo, _ = data_repo
    result = run(["python", "-m", "pcam_pipeline.dvc.cache"], repo)
    assert "dvc cache: cache.type hardlink: works" in result.stdout
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(repo).st_dev:
        pytest.skip("no second file system (/dev/shm) to put the cache on")
    cache = Path("/dev/shm") / f"pcam-test-cache-{os.getpid()}"
    try:
        run(["dvc", "cache", "dir", "--local", str(cache)], repo)
        result = run(["python", "-m", "pcam_pipeline.dvc.cache"], repo)
        assert "warning: cache.type falls back to symlink" in result.stdout
        assert "hardlink not supported: Invalid cross-device link" in result.stdout
    finally:
        shutil.rmtree(cache, ignore_errors=True)
