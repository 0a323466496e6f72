"""The bundle's stand-alone runner (`pcam_runner.py`) in-process: folders, single images and
HDF5 files scored in the order given with the model card's threshold, its CSV written whole or
not at all, and bad input named with exit code 2 (tests/integration/test_bundle.py runs it as
users do, in a venv without the project)."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.export import runner
from tests.serving import encode


@pytest.fixture(scope="module")
def export_dir(exported_run: Path) -> Path:
    return exported_run / "models" / "export"


@pytest.fixture(scope="module")
def patches(tiny_data: Path) -> np.ndarray:
    with h5py.File(tiny_data / "test.h5") as handle:
        return handle["x"][:6]


def score(export_dir: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    args = [*map(str, inputs), "--out", str(out), "--model", str(export_dir / "model.onnx")]
    return runner.main([*args, "--card", str(export_dir / "model_card.json"), *extra])


def rows(out: Path) -> list[dict[str, str]]:
    with open(out) as handle:
        return list(csv.DictReader(handle))


def test_folders_images_and_hdf5_are_scored_in_order(export_dir, patches, tmp_path):
    import onnxruntime as ort

    folder = tmp_path / "patches"
    folder.mkdir()
    for i in (1, 0):
        (folder / f"p{i}.png").write_bytes(encode(patches[i]))
    (folder / "notes.txt").write_text("not a patch: skipped by suffix")
    single = tmp_path / "single.tiff"
    single.write_bytes(encode(patches[2], "TIFF"))
    h5 = tmp_path / "more.h5"
    with h5py.File(h5, "w") as handle:
        handle["x"] = patches[3:]
    out = tmp_path / "scores.csv"
    assert score(export_dir, [folder, single, h5], out, "--threshold", "0.5") == 0
    got = rows(out)
    assert [Path(r["patch"]).name for r in got] == [
        "p0.png", "p1.png", "single.tiff", "more.h5[0]", "more.h5[1]", "more.h5[2]"
    ]  # fmt: skip
    session = ort.InferenceSession(str(export_dir / "model.onnx"))
    expected = session.run(None, {"patches": patches})[0]
    np.testing.assert_allclose([float(r["probability"]) for r in got], expected, atol=1e-6)
    assert [r["prediction"] for r in got] == [
        str(int(p >= 0.5)) for p in [float(r["probability"]) for r in got]
    ]


def test_bad_input_exits_2_naming_it_and_writes_no_csv(export_dir, patches, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    grey = tmp_path / "grey.png"
    grey.write_bytes(encode(patches[0][..., 0]))
    assert score(export_dir, [grey], out) == 2
    assert "grey.png: mode L, expected an 8-bit RGB(A) patch" in capsys.readouterr().err
    assert score(export_dir, [tmp_path / "missing.png"], out) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as handle:
        handle["y"] = np.zeros(3)
    assert score(export_dir, [wrong], out) == 2
    assert "expected dataset 'x' of shape (N, 96, 96, 3)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".scores.csv.tmp-*"))
