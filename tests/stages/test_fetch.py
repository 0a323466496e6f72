import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.data.pcam import SPLITS, all_file_names, split_files
from pcam_pipeline.data.placement import SourceError
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.stages import fetch
from tests.conftest import REPO_ROOT
from tests.pcam_files import make_pcam_dir, read

RELEASE_CHECKSUMS = REPO_ROOT / "data" / "pcam.md5"


def test_synthetic_is_deterministic_and_seed_dependent():
    x1, y1 = generate_split(3, "train", 40, 0.5)
    x2, y2 = generate_split(3, "train", 40, 0.5)
    x3, _ = generate_split(4, "train", 40, 0.5)
    assert x1.tobytes() == x2.tobytes() and y1.tobytes() == y2.tobytes()
    assert x1.tobytes() != x3.tobytes()
    valid, _ = generate_split(3, "valid", 40, 0.5)
    assert valid.tobytes() != x1.tobytes()


def test_synthetic_has_pcam_balance_and_a_centre_signal():
    x, y = generate_split(11, "train", 400, 0.5)
    assert x.dtype == np.uint8 and x.shape == (400, 96, 96, 3)
    assert y.sum() == 200
    centre = x[:, 32:64, 32:64].reshape(400, -1).mean(axis=1)
    # Tumour-like nuclei darken the centre of positives; the label is learnable from it.
    assert centre[y == 1].mean() < centre[y == 0].mean() - 10
    # Stain and brightness vary between patches like slides do.
    assert x.reshape(400, -1, 3).mean(axis=1).std(axis=0).min() > 3


def test_fetch_synthetic_writes_pcam_files(in_tmp_project: Path, small_params):
    fetch.main(small_params)
    for split in SPLITS:
        x_path, y_path = split_files(Path("data/pcam"), split)
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            assert list(fx) == ["x"] and list(fy) == ["y"]
            n = getattr(small_params.fetch.sizes, split)
            assert fx["x"].shape == (n, 96, 96, 3) and fx["x"].dtype == np.uint8
            assert fy["y"].shape == (n, 1, 1, 1) and fy["y"].dtype == np.uint8
    assert not list(Path("data/pcam").glob(".*tmp*")), "no temporary files left behind"


def md5s(directory: Path) -> dict[str, str]:
    return {n: hashlib.md5((directory / n).read_bytes()).hexdigest() for n in all_file_names()}


@pytest.mark.parametrize("link", ["hardlink", "copy"])
def test_path_source_verifies_and_places_files(tmp_path, make_params, monkeypatch, link):
    shared, checksums = shared_copy(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    params = make_params(
        fetch={"source": "path", "input": str(shared), "link": link, "checksums": str(checksums)}
    )
    fetch.main(params)
    for name in all_file_names():
        placed, original = work / "data/pcam" / name, shared / name
        assert placed.read_bytes() == original.read_bytes()
        assert (os.stat(placed).st_ino == os.stat(original).st_ino) == (link == "hardlink")


def shared_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A shared copy of the six files and an md5sum file of them."""
    shared = make_pcam_dir(tmp_path / "shared")
    checksums = tmp_path / "md5.txt"
    checksums.write_text("".join(f"{md5}  {name}\n" for name, md5 in md5s(shared).items()))
    return shared, checksums


def test_path_source_names_missing_files_and_md5s_before_reading_any(
    tmp_path, make_params, monkeypatch
):
    shared, checksums = shared_copy(tmp_path)
    split_files(shared, "valid")[1].unlink()
    lines = checksums.read_text().splitlines()
    checksums.write_text("\n".join(line for line in lines if "test_y" not in line) + "\n")
    monkeypatch.chdir(tmp_path)
    params = make_params(
        fetch={"source": "path", "input": str(shared), "checksums": str(checksums)}
    )
    with pytest.raises(SourceError) as info:
        fetch.main(params)
    message = str(info.value)
    assert "camelyonpatch_level_2_split_valid_y.h5: missing" in message
    assert f"{checksums}: no md5 for camelyonpatch_level_2_split_test_y.h5" in message
    assert f"md5sum FILE >> {checksums}" in message
    assert not Path("data/pcam").exists() or not any(Path("data/pcam").iterdir())


@pytest.mark.parametrize("link", ["hardlink", "copy"])
def test_a_wrong_file_fails_the_whole_fetch_and_leaves_data_pcam_as_it_was(
    tmp_path, make_params, monkeypatch, link
):
    shared, checksums = shared_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = make_params(
        fetch={"source": "path", "input": str(shared), "checksums": str(checksums), "link": link}
    )
    fetch.main(params)
    before = md5s(Path("data/pcam"))
    # The shared copy is replaced by damaged files (never edited in place: data/pcam links it)
    for split in ("test", "train"):
        x_path = split_files(shared, split)[0]
        x, _ = read(shared, split)
        x[0, 0, 0, 0] ^= 1
        x_path.unlink()
        with h5py.File(x_path, "w") as handle:
            handle.create_dataset("x", data=x)
    with pytest.raises(SourceError) as info:
        fetch.main(params)
    message = str(info.value)
    assert "camelyonpatch_level_2_split_test_x.h5: md5" in message
    assert "camelyonpatch_level_2_split_train_x.h5: md5" in message, "every bad file named"
    assert "fetch.checksums" in message
    assert md5s(Path("data/pcam")) == before
    assert sorted(p.name for p in Path("data/pcam").iterdir()) == sorted(all_file_names())


def test_a_checksums_file_that_cannot_be_read_is_named(tmp_path, make_params, monkeypatch):
    shared, checksums = shared_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    missing = make_params(fetch={"source": "path", "input": str(shared), "checksums": "no.md5"})
    with pytest.raises(PipelineError, match=r"fetch\.checksums: no\.md5 cannot be read"):
        fetch.main(missing)
    checksums.write_text("not-an-md5  camelyonpatch_level_2_split_train_x.h5\n")
    bad = make_params(fetch={"source": "path", "input": str(shared), "checksums": str(checksums)})
    with pytest.raises(PipelineError, match=r"md5.txt:1: expected '<32-hex md5>"):
        fetch.main(bad)


def test_path_source_without_directory(tmp_path, make_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = make_params(
        fetch={"source": "zenodo", "input": "data/raw", "checksums": str(RELEASE_CHECKSUMS)}
    )
    with pytest.raises(SourceError, match="pcam download"):
        fetch.main(params)
