"""Drift detection on the synthetic generator: held-out draws from the training distribution
raise no alarm beyond the stated rate; a stain shift, blur, JPEG, a brightness change and real
tissue from a package-shipped image are each detected; the inputs, the report and `pcam drift`
(in-process, so coverage counts it)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import binom

from pcam_pipeline import cli
from pcam_pipeline.data.synthetic import generate_split
from pcam_pipeline.drift import detector, features
from pcam_pipeline.drift.detector import EXIT_DRIFT, Sample, adjusted, detect, mmd_test
from pcam_pipeline.drift.inputs import read_input
from pcam_pipeline.drift.profile import Reference, load_reference
from pcam_pipeline.errors import PipelineError
from tests.drift_references import REFERENCE_PATCHES, image_reference

ALPHA = 0.05
DRAWS = 50
DRAW_PATCHES = 128
POOL_PATCHES = 1024


@pytest.fixture(scope="module")
def reference() -> Reference:
    train, _ = generate_split(0, "train", REFERENCE_PATCHES, 0.5)
    return image_reference(train)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """Patches of the same distribution the reference never saw (another seed and split)."""
    return generate_split(1, "valid", POOL_PATCHES, 0.5)[0]


def image_sample(patches: np.ndarray, reference: Reference) -> Sample:
    table = features.patch_features(patches, reference.stain_vectors)
    return Sample({name: table.column(name) for name in features.FEATURES})


def image_report(patches: np.ndarray, reference: Reference) -> detector.DriftReport:
    sample = image_sample(patches, reference)
    return detect(reference.sample(False, False), sample, ALPHA, "holm", 0, 0)


def test_held_out_draws_raise_no_alarm_at_the_stated_rate(reference, held_out):
    table = features.patch_features(held_out, reference.stain_vectors)
    rng = np.random.default_rng(2026)
    alarms = 0
    for _ in range(DRAWS):
        rows = rng.choice(len(held_out), DRAW_PATCHES, replace=False)
        sample = Sample({name: table.values[rows, i] for i, name in enumerate(features.FEATURES)})
        alarms += detect(reference.sample(False, False), sample, ALPHA, "holm", 0, 0).drift
    # Holm keeps the family-wise false-alarm rate at most ALPHA; over DRAWS draws the alarms
    # are then at most Binomial(DRAWS, ALPHA), whose 99.9th percentile bounds them here.
    bound = int(binom.ppf(0.999, DRAWS, ALPHA))
    print(
        f"false alarms: {alarms}/{DRAWS} = {alarms / DRAWS:.3f} observed; stated rate {ALPHA}, "
        f"binomial 99.9% bound {bound}/{DRAWS}"
    )
    assert alarms <= bound


def hed_jitter(x: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(x)
    hed[..., 0] *= 1.3  # more hematoxylin, less eosin: another stain batch
    hed[..., 1] *= 0.8
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def blur(x: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0, 0))


def jpeg_30(x: np.ndarray) -> np.ndarray:
    out = []
    for patch in x:
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, "JPEG", quality=30)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def brighter_20(x: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)


def real_tissue(x: np.ndarray) -> np.ndarray:
    """96x96 patches cut from scikit-image's ihc.png (colonic glands, IHC with hematoxylin
    counterstain; "no known copyright restrictions" per skimage.data): real tissue, unlike the
    synthetic reference."""
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    steps = range(0, image.shape[0] - 96 + 1, 32)
    return np.stack([image[r : r + 96, c : c + 96] for r in steps for c in steps])[: len(x)]


@pytest.mark.parametrize("shift", [hed_jitter, blur, jpeg_30, brighter_20, real_tissue])
def test_each_shift_is_detected(reference, held_out, shift):
    report = image_report(shift(held_out[:DRAW_PATCHES]), reference)
    strongest = min(report.tests, key=lambda t: t.p_value)
    print(f"{shift.__name__}: strongest {strongest.name} p={strongest.p_value:.1e}")
    assert report.drift
    assert report.n_tests == len(features.FEATURES)


def test_holm_and_bonferroni_adjust_for_the_number_of_tests():
    p = np.array([0.01, 0.04, 0.03])
    assert adjusted(p, "bonferroni").tolist() == pytest.approx([0.03, 0.12, 0.09])
    assert adjusted(p, "holm").tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert adjusted(np.array([]), "holm").size == 0


def test_the_embedding_mmd_sees_a_shift_and_not_a_fresh_draw():
    rng = np.random.default_rng(0)
    reference, same = rng.normal(size=(200, 16)), rng.normal(size=(150, 16))
    shifted = rng.normal(size=(150, 16)) + 0.3
    _, p_same = mmd_test(reference, same, 100, 0)
    statistic, p_shift = mmd_test(reference, shifted, 100, 0)
    assert p_same > 0.05
    assert statistic > 0 and p_shift == pytest.approx(1 / 101)
    report = detect(
        Sample({}, reference), Sample({}, shifted), ALPHA, "bonferroni", 100, 0, ["a note"]
    )
    assert report.drift and report.tests[0].test == "mmd"
    assert "DRIFT" in report.table() and "note: a note" in report.table()


def test_blank_glass_has_no_tissue_and_the_default_stain_vectors():
    glass = np.full((4, 96, 96, 3), 250, dtype=np.uint8)
    assert features.tissue_fraction(glass).tolist() == [0.0] * 4
    assert features.blank_fraction(features.tissue_fraction(glass)) == 1.0
    assert features.blank_fraction(np.array([])) == 0.0
    vectors = features.macenko_vectors(glass)
    assert features.stain_angles(vectors, features.RUIFROK / 1.0).shape == (2,)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_the_reference_round_trips_and_a_foreign_one_is_refused(reference, tmp_path):
    reference.save(tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref")
    assert np.array_equal(loaded.features, reference.features)
    assert loaded.meta == reference.meta
    with pytest.raises(PipelineError, match=r"reference.json: not found.*drift_reference"):
        load_reference(tmp_path / "missing")
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    (tmp_path / "ref" / "reference.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(PipelineError, match="version 0"):
        load_reference(tmp_path / "ref")
    (tmp_path / "ref" / "reference.npz").write_bytes(b"not numpy")
    with pytest.raises(PipelineError, match="not a drift reference"):
        load_reference(tmp_path / "ref")


def write_x(path: Path, x: np.ndarray) -> Path:
    with h5py.File(path, "w") as handle:
        handle["x"] = x
    return path


def test_inputs_hdf5_folders_of_images_and_their_refusals(held_out, tmp_path):
    sample = read_input(write_x(tmp_path / "a_x.h5", held_out[:20]), 8, 0)
    assert sample.shape == (8, 96, 96, 3)
    folder = tmp_path / "slide" / "patches"
    folder.mkdir(parents=True)
    for i, patch in enumerate(held_out[:3]):
        Image.fromarray(patch).save(folder / f"{i}.png")
    Image.fromarray(held_out[3]).save(folder / "3.jpg", quality=90)
    assert read_input(tmp_path / "slide", 10, 0).shape == (4, 96, 96, 3)
    assert read_input(tmp_path / "slide", 2, 0).shape == (2, 96, 96, 3)
    assert read_input(folder / "0.png", 10, 0).shape == (1, 96, 96, 3)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "small.png")
    with pytest.raises(PipelineError, match=r"small.png: 64x64 pixels, expected 96x96.*Fix"):
        read_input(folder, 10, 0)
    refusals = {
        tmp_path / "nothing": "not found",
        write_x(tmp_path / "b_x.h5", np.zeros((2, 32, 32), np.uint8)): "expected uint8",
        write_x(tmp_path / "c_x.h5", np.zeros((0, 96, 96, 3), np.uint8)): "no patches",
        tmp_path / "empty": "no PNG, TIFF or JPEG",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "d_x.h5").write_bytes(b"not hdf5")
    refusals[tmp_path / "d_x.h5"] = "cannot read key x"
    for path, message in refusals.items():
        with pytest.raises(PipelineError, match=message):
            read_input(path, 10, 0)


def test_pcam_drift_exit_codes_json_and_plots(reference, held_out, tmp_path, capsys):
    reference.save(tmp_path / "ref")
    common = ["--reference", str(tmp_path / "ref"), "--checkpoint", str(tmp_path / "none.pt")]
    common += ["--plots", str(tmp_path / "plots")]
    calm = write_x(tmp_path / "calm_x.h5", held_out[:DRAW_PATCHES])
    code = cli.main(["drift", str(calm), "--out", str(tmp_path / "calm.json"), *common])
    report = json.loads((tmp_path / "calm.json").read_text())
    assert code == 0 and report["drift"] is False
    assert report["alpha"] == 0.05 and report["correction"] == "holm"
    assert {t["name"] for t in report["tests"]} == set(features.FEATURES)
    assert all({"statistic", "p_value", "p_adjusted"} <= set(t) for t in report["tests"])
    assert "model tests (confidence, embedding MMD) skipped" in report["notes"][0]
    assert set(report["stain_vector_angles_deg"]) == {"hematoxylin", "eosin"}
    assert (tmp_path / "plots" / "calm_x.png").stat().st_size > 0

    bright = write_x(tmp_path / "bright_x.h5", brighter_20(held_out[:DRAW_PATCHES]))
    code = cli.main(["drift", str(bright), "--out", str(tmp_path / "bright.json"), *common])
    assert code == EXIT_DRIFT == 3
    assert json.loads((tmp_path / "bright.json").read_text())["drift"] is True
    assert "DRIFT at alpha 0.05 (holm over 15 tests)" in capsys.readouterr().out

    code = cli.main(["drift", str(tmp_path / "no.h5"), "--out", str(tmp_path / "x.json"), *common])
    assert code == 1 and not (tmp_path / "x.json").exists()
    assert "no.h5: not found. Fix: give a PCAM-format HDF5" in capsys.readouterr().err
