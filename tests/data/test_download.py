import hashlib
from pathlib import Path

import pytest

from pcam_pipeline.data.download import DownloadError, download_pcam_file
from pcam_pipeline.data.pcam import all_file_names
from pcam_pipeline.stages import fetch
from tests.http_server import Behaviour, gzip_files, serve
from tests.pcam_files import make_pcam_dir

NAME = "camelyonpatch_level_2_split_train_x.h5"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    source = make_pcam_dir(tmp_path / "release", {"train": 48, "valid": 16, "test": 16})
    return source, gzip_files(source)


def test_download_verifies_and_unpacks(tmp_path, release):
    source, files = release
    behaviour = Behaviour(files=files)
    with serve(behaviour) as url:
        out = download_pcam_file(
            url, NAME, tmp_path / "raw", md5((source / NAME).read_bytes()), md5(files[f"{NAME}.gz"])
        )
    assert out.read_bytes() == (source / NAME).read_bytes()
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [NAME], "no partial left"
    # Present and verified: nothing is fetched again.
    with serve(behaviour) as url:
        download_pcam_file(url, NAME, tmp_path / "raw", md5(out.read_bytes()), None)
    assert len(behaviour.requests) == 1


def test_corrupt_download_is_refused_and_leaves_nothing(tmp_path, release):
    source, files = release
    corrupt = dict(files)
    body = bytearray(files[f"{NAME}.gz"])
    body[len(body) // 2] ^= 0xFF
    corrupt[f"{NAME}.gz"] = bytes(body)
    with serve(Behaviour(files=corrupt)) as url, pytest.raises(DownloadError) as info:
        download_pcam_file(
            url, NAME, tmp_path / "raw", md5((source / NAME).read_bytes()), md5(files[f"{NAME}.gz"])
        )
    assert "md5" in str(info.value) and "published" in str(info.value)
    assert "nothing was written" in str(info.value)
    assert list((tmp_path / "raw").iterdir()) == []


def test_unpacked_md5_mismatch_keeps_no_final_file(tmp_path, release):
    _, files = release
    with serve(Behaviour(files=files)) as url, pytest.raises(DownloadError, match="unpacked md5"):
        download_pcam_file(url, NAME, tmp_path / "raw", "0" * 32, md5(files[f"{NAME}.gz"]))
    assert not (tmp_path / "raw" / NAME).exists()
    assert not [p for p in (tmp_path / "raw").iterdir() if not p.name.startswith(".")]


def test_interrupted_transfer_resumes_with_a_range_request(tmp_path, release):
    source, files = release
    gz = files[f"{NAME}.gz"]
    behaviour = Behaviour(files=files, cut_after={f"{NAME}.gz": len(gz) // 3})
    with serve(behaviour) as url:
        out = download_pcam_file(
            url, NAME, tmp_path / "raw", md5((source / NAME).read_bytes()), md5(gz)
        )
    assert out.read_bytes() == (source / NAME).read_bytes()
    assert behaviour.requests == [(f"{NAME}.gz", None), (f"{NAME}.gz", f"bytes={len(gz) // 3}-")]


def test_partial_file_from_an_earlier_run_is_continued(tmp_path, release):
    source, files = release
    gz = files[f"{NAME}.gz"]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / f".{NAME}.gz.part").write_bytes(gz[:1000])
    behaviour = Behaviour(files=files)
    with serve(behaviour) as url:
        download_pcam_file(url, NAME, raw, md5((source / NAME).read_bytes()), md5(gz))
    assert behaviour.requests == [(f"{NAME}.gz", "bytes=1000-")]
    assert (raw / NAME).read_bytes() == (source / NAME).read_bytes()


def test_server_ignoring_range_restarts_cleanly(tmp_path, release):
    source, files = release
    gz = files[f"{NAME}.gz"]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / f".{NAME}.gz.part").write_bytes(b"garbage" * 10)
    with serve(Behaviour(files=files, ignore_range=True)) as url:
        download_pcam_file(url, NAME, raw, md5((source / NAME).read_bytes()), md5(gz))
    assert (raw / NAME).read_bytes() == (source / NAME).read_bytes()


def test_missing_file_is_a_clear_http_error(tmp_path):
    with serve(Behaviour()) as url, pytest.raises(DownloadError, match="HTTP 404"):
        download_pcam_file(url, NAME, tmp_path / "raw", None, None)


def test_pcam_download_then_zenodo_source(tmp_path, release, make_params, monkeypatch):
    """`pcam download` fills data/raw from the (local) server; fetch with source zenodo uses it."""
    source, files = release
    checksums = tmp_path / "md5.txt"
    lines = [f"{md5((source / n).read_bytes())}  {n}" for n in all_file_names()]
    lines += [f"{md5(files[n + '.gz'])}  {n}.gz" for n in all_file_names()]
    checksums.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    with serve(Behaviour(files=files)) as url:
        params = make_params(
            fetch={
                "source": "zenodo",
                "input": "data/raw",
                "zenodo_url": url,
                "checksums": str(checksums),
            }
        )
        from pcam_pipeline.cli import main

        params_file = tmp_path / "params.yaml"
        import yaml

        params_file.write_text(yaml.safe_dump(params.as_dict()))
        assert main(["--params", str(params_file), "download"]) == 0
    fetch.main(params)
    for name in all_file_names():
        assert (tmp_path / "data/pcam" / name).read_bytes() == (source / name).read_bytes()
