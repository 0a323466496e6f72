"""dvc_state: md5s read from and recorded into a real DVC repository's state database."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcam_pipeline.data import placement
from pcam_pipeline.data.placement import SourceError
from pcam_pipeline.dvc.state import known_hashes
from pcam_pipeline.stages import fetch, preprocess
from tests.pcam_files import make_pcam_dir

DVC = str(Path(sys.executable).parent / "dvc")


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [DVC, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "--local", "core.site_cache_dir", str(tmp_path / "site"))
    return repo


def added_md5(repo: Path, name: str) -> str:
    dvc(repo, "add", name)
    return yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0]["md5"]


def test_dvc_takes_a_recorded_md5_instead_of_hashing(dvc_repo: Path):
    # A deliberately wrong md5 shows that DVC used the record and did not read the file.
    (dvc_repo / "f").write_bytes(b"some bytes")
    with known_hashes(dvc_repo) as known:
        assert known.active
        known.record(dvc_repo / "f", "0" * 32)
    assert added_md5(dvc_repo, "f") == "0" * 32


def test_md5s_dvc_computed_are_read_back_while_the_file_is_unchanged(dvc_repo: Path):
    path = dvc_repo / "g"
    path.write_bytes(b"other bytes")
    md5 = added_md5(dvc_repo, "g")
    assert md5 == hashlib.md5(b"other bytes").hexdigest()
    with known_hashes(dvc_repo) as known:
        assert known.md5(path) == md5
    os.chmod(path, 0o644)
    path.write_bytes(b"changed bytes")
    with known_hashes(dvc_repo) as known:
        assert known.md5(path) is None


def test_outside_a_dvc_repository_nothing_is_known_or_recorded(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"x")
    with known_hashes(tmp_path) as known:
        assert not known.active
        known.record(tmp_path / "f", "0" * 32)
        assert known.md5(tmp_path / "f") is None


def test_fetch_reuses_dvcs_md5_of_the_source_and_records_its_links(
    dvc_repo: Path, make_params, monkeypatch: pytest.MonkeyPatch
):
    source = make_pcam_dir(dvc_repo / "shared")
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()}
    (dvc_repo / "sums.md5").write_text("".join(f"{m}  {n}\n" for n, m in sums.items()))
    # A record in DVC's state (an earlier fetch, `pcam download`) is what fetch takes instead
    # of reading the file: a wrong one is what fetch must believe.
    victim = sorted(sums)[0]
    with known_hashes(dvc_repo) as known:
        known.record(source / victim, "f" * 32)
    params = make_params(
        fetch={"source": "path", "input": str(source), "checksums": str(dvc_repo / "sums.md5")}
    )
    monkeypatch.chdir(dvc_repo)
    with pytest.raises(SourceError, match=f"{victim}: md5 f{{32}} != expected"):
        fetch.main(params)
    os.utime(source / victim)  # the file changed for DVC: its record no longer holds
    fetch.main(params)
    with known_hashes(dvc_repo) as known:
        for name, md5 in sums.items():
            assert known.md5(dvc_repo / "data" / "pcam" / name) == md5


def test_download_records_the_md5_of_what_it_unpacked(dvc_repo: Path):
    from pcam_pipeline.data.download import download_pcam_file
    from tests.http_server import Behaviour, gzip_files, serve

    source = make_pcam_dir(dvc_repo.parent / "release", {"train": 16, "valid": 8, "test": 8})
    name = "camelyonpatch_level_2_split_valid_y.h5"
    expected = hashlib.md5((source / name).read_bytes()).hexdigest()
    with serve(Behaviour(files=gzip_files(source))) as url:
        final = download_pcam_file(url, name, dvc_repo / "data" / "raw", expected, None)
    with known_hashes(dvc_repo) as known:
        assert known.md5(final) == expected


def test_fetch_records_the_shared_copy_too_so_a_second_fetch_reads_nothing(
    dvc_repo: Path, make_params, monkeypatch: pytest.MonkeyPatch
):
    source = make_pcam_dir(dvc_repo.parent / "shared")
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()}
    (dvc_repo / "sums.md5").write_text("".join(f"{m}  {n}\n" for n, m in sums.items()))
    params = make_params(
        fetch={"source": "path", "input": str(source), "checksums": str(dvc_repo / "sums.md5")}
    )
    monkeypatch.chdir(dvc_repo)
    fetch.main(params)
    with known_hashes(dvc_repo) as known:
        assert {name: known.md5(source / name) for name in sums} == sums
    monkeypatch.setattr(placement, "md5_file", lambda path: pytest.fail(f"{path} read again"))
    fetch.main(params)


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_preprocess_records_the_md5s_it_computed_as_it_wrote(
    dvc_repo: Path, make_params, monkeypatch: pytest.MonkeyPatch, layout: str
):
    make_pcam_dir(dvc_repo / "data" / "pcam")
    monkeypatch.chdir(dvc_repo)
    preprocess.main(make_params(preprocess={"layout": layout}))
    with known_hashes(dvc_repo) as known:
        for name in ("train.h5", "valid.h5", "test.h5"):
            path = dvc_repo / "data" / "processed" / name
            md5 = hashlib.md5(path.read_bytes()).hexdigest()
            assert known.md5(path) == (md5 if layout == "contiguous" else None), name


def test_processed_md5s_come_from_dvcs_state_for_large_files(
    dvc_repo: Path, make_params, monkeypatch: pytest.MonkeyPatch
):
    from pcam_pipeline.data import processed
    from pcam_pipeline.data.processed import ProcessedData

    make_pcam_dir(dvc_repo / "data" / "pcam")
    monkeypatch.chdir(dvc_repo)
    preprocess.main(make_params())
    dataset = ProcessedData(dvc_repo / "data" / "processed")
    train = dataset.split_path("train")
    read = {
        name: hashlib.md5((dataset.root / name).read_bytes()).hexdigest()
        for name in ("stats.json", "train.h5")
    }
    assert dataset.md5s("train") == read
    # A wrong record shows which one was used: small files are hashed, large ones asked for.
    with known_hashes(dvc_repo) as known:
        known.record(train, "0" * 32)
    assert dataset.md5s("train") == read
    monkeypatch.setattr(processed, "ASK_DVC_ABOVE_BYTES", 0)
    assert dataset.md5s("train") == {**read, "train.h5": "0" * 32}
