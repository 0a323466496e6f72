"""`pcam predict`: the offline handover scores HDF5 and PNG patches exactly as evaluate does."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from pcam_pipeline import cli
from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.inference import model_from_checkpoint, predict_batches, predict_split
from pcam_pipeline.predict import read_png
from tests.tiny_pipeline import small_run_params


def evaluate_probabilities(checkpoint: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test-split images and the probabilities evaluate computes for them (same calls, same
    batch size)."""
    params = small_run_params()
    device = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(checkpoint, device)
    split = Split.open(data / "test.h5", params.loader)
    batches = DeviceBatches(split, device, params.loader)
    probs = predict_split(model, batches, mean, std, params.evaluate.batch_size)
    with h5py.File(data / "test.h5", "r") as handle:
        images = handle["x"][...]
    return images, probs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_hdf5_matches_evaluate(trained_run, tiny_data, tmp_path):
    checkpoint = trained_run / "models" / "best.pt"
    _, expected = evaluate_probabilities(checkpoint, tiny_data)
    # The handover: another directory, no params.yaml, no dataset, only the checkpoint.
    env = {k: v for k, v in os.environ.items() if k != "PCAM_TRAIN_DATA_DIR"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pcam_pipeline.cli",
            "predict",
            str(checkpoint),
            str(tiny_data / "test.h5"),
            "--out",
            "scores.csv",
            "--threshold",
            "0.5",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_csv(tmp_path / "scores.csv")
    assert [row["patch"] for row in rows] == [
        f"{tiny_data / 'test.h5'}[{i}]" for i in range(len(expected))
    ]
    assert [row["probability"] for row in rows] == [f"{p:.6f}" for p in expected]
    assert [int(row["prediction"]) for row in rows] == [int(p >= 0.5) for p in expected]


def test_predict_on_png_files_matches_evaluate(trained_run, tiny_data, tmp_path):
    checkpoint = trained_run / "models" / "best.pt"
    images, expected = evaluate_probabilities(checkpoint, tiny_data)
    pngs = []
    for i in range(10):
        path = tmp_path / f"patch-{i:02d}.png"
        mpimg.imsave(path, images[i])  # written as 8-bit RGBA
        assert np.array_equal(read_png(path), images[i]), "PNG round trip is lossless"
        pngs.append(path)
    out = tmp_path / "out" / "scores.csv"
    assert (
        cli.main(
            ["predict", str(checkpoint), *map(str, pngs), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    rows = read_csv(out)
    assert [row["patch"] for row in rows] == [str(p) for p in pngs]
    assert "prediction" not in rows[0], "no threshold given: probabilities only"
    probs = np.array([float(row["probability"]) for row in rows])
    # another batch composition than evaluate's: equal up to float rounding and the 6 decimals
    np.testing.assert_allclose(probs, expected[:10], rtol=0, atol=1e-6)


def test_predict_keeps_the_order_of_mixed_inputs(trained_run, tiny_data, tmp_path):
    images, _ = evaluate_probabilities(trained_run / "models" / "best.pt", tiny_data)
    first, last = tmp_path / "a.png", tmp_path / "z.png"
    mpimg.imsave(first, images[0])
    mpimg.imsave(last, images[1])
    with h5py.File(tmp_path / "two.h5", "w") as handle:
        handle.create_dataset("x", data=images[:2])
    out = tmp_path / "scores.csv"
    assert (
        cli.main(
            [
                "predict",
                str(trained_run / "models" / "best.pt"),
                str(last),
                str(tmp_path / "two.h5"),
                str(first),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [row["patch"] for row in rows] == [
        str(last),
        f"{tmp_path / 'two.h5'}[0]",
        f"{tmp_path / 'two.h5'}[1]",
        str(first),
    ]
    probs = [float(row["probability"]) for row in rows]
    assert probs[0] == pytest.approx(probs[2], abs=1e-6)
    assert probs[1] == pytest.approx(probs[3], abs=1e-6)


@pytest.mark.parametrize("case", ["small png", "no x", "missing"])
def test_predict_rejects_bad_inputs_with_a_clear_message(case, trained_run, tmp_path, capsys):
    if case == "small png":
        bad = tmp_path / "small.png"
        mpimg.imsave(bad, np.zeros((64, 64, 3), dtype=np.uint8))
        expected = "expected 96x96 RGB"
    elif case == "no x":
        bad = tmp_path / "labels.h5"
        with h5py.File(bad, "w") as handle:
            handle.create_dataset("y", data=np.zeros(3, dtype=np.uint8))
        expected = "no dataset 'x'"
    else:
        bad = tmp_path / "absent.png"
        expected = "no such file"
    out = tmp_path / "scores.csv"
    assert (
        cli.main(["predict", str(trained_run / "models" / "best.pt"), str(bad), "--out", str(out)])
        == 1
    )
    message = capsys.readouterr().err
    assert str(bad) in message and expected in message
    assert not out.exists(), "nothing half written"


# --- test-time augmentation ---------------------------------------------------------------------


def scores(checkpoint: Path, images: np.ndarray, tta: str) -> np.ndarray:
    device = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(checkpoint, device)
    return predict_batches(model, [torch.from_numpy(images)], mean, std, device, tta=tta)


def test_d8_scores_a_rotated_or_flipped_copy_the_same(trained_run, tiny_data):
    checkpoint = trained_run / "models" / "best.pt"
    images, plain = evaluate_probabilities(checkpoint, tiny_data)
    rotated = np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)))
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    d8 = scores(checkpoint, images, "d8")
    np.testing.assert_allclose(scores(checkpoint, rotated, "d8"), d8, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores(checkpoint, flipped, "d8"), d8, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores(checkpoint, flipped, "flips"), scores(
        checkpoint, images, "flips"), rtol=0, atol=1e-6)  # fmt: skip
    # ...where the model alone is not invariant: the test can tell.
    assert np.abs(scores(checkpoint, rotated, "none") - plain).max() > 1e-3
    assert np.abs(d8 - plain).max() > 1e-4, "d8 is not the plain score"
    assert np.array_equal(scores(checkpoint, images, "none"), plain)


def test_d8_is_the_mean_over_the_eight_symmetries(trained_run, tiny_data):
    checkpoint = trained_run / "models" / "best.pt"
    images = evaluate_probabilities(checkpoint, tiny_data)[0][:8]
    turned = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    orbit = turned + [t[:, ::-1] for t in turned]
    each = [scores(checkpoint, np.ascontiguousarray(view), "none") for view in orbit]
    np.testing.assert_allclose(scores(checkpoint, images, "d8"), np.mean(each, axis=0), atol=1e-6)


def test_predict_takes_the_tta_option(trained_run, tiny_data, tmp_path):
    checkpoint = trained_run / "models" / "best.pt"
    images, _ = evaluate_probabilities(checkpoint, tiny_data)
    out = tmp_path / "scores.csv"
    assert cli.main(["predict", str(checkpoint), str(tiny_data / "test.h5"), "--out", str(out),
                     "--device", "cpu", "--tta", "d8"]) == 0  # fmt: skip
    expected = scores(checkpoint, images, "d8")
    assert [row["probability"] for row in read_csv(out)] == [f"{p:.6f}" for p in expected]
