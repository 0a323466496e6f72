import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.data.pcam import split_files
from pcam_pipeline.stages import validate
from pcam_pipeline.stages.validate import ValidationFailed, blank_mask, validate_dir
from tests.pcam_files import make_pcam_dir, read, rewrite


@pytest.fixture
def pcam(tmp_path: Path) -> Path:
    return make_pcam_dir(tmp_path / "data" / "pcam")


def problems(report: dict, check: str) -> list[dict]:
    return [p for p in report["problems"] if p["check"] == check]


def test_clean_data_passes(pcam, small_params):
    report = validate_dir(pcam, small_params.validate_)
    assert report["ok"] and report["errors"] == 0
    assert report["splits"]["train"]["n"] == 64
    assert report["splits"]["train"]["positive_fraction"] == 0.5
    assert report["leakage"] == {}


def test_uint32_pixels_are_flagged_as_poisoning(pcam, small_params):
    x, _ = read(pcam, "train")
    poisoned = x.astype(np.uint32)
    poisoned[5, 0, 0, 0] = 70000
    rewrite(pcam, "train", "x", "x", poisoned)
    report = validate_dir(pcam, small_params.validate_)
    [dtype] = problems(report, "dtype")
    assert dtype["severity"] == "error" and "uint32" in dtype["message"]
    assert "poisoning" in dtype["message"]
    [out_of_range] = problems(report, "range")
    assert out_of_range["indices"] == [5]
    relaxed = small_params.validate_.model_copy(update={"allow_unsafe_dtype": True})
    assert validate_dir(pcam, relaxed)["ok"], "allowed, it becomes a warning"


def test_nan_in_float_pixels(pcam, small_params):
    x, _ = read(pcam, "valid")
    floats = x.astype(np.float32)
    floats[3, 10, 10, 1] = np.nan
    floats[7, 0, 0, 0] = np.inf
    rewrite(pcam, "valid", "x", "x", floats)
    report = validate_dir(pcam, small_params.validate_)
    [nonfinite] = problems(report, "nonfinite")
    assert nonfinite["split"] == "valid" and nonfinite["indices"] == [3, 7]
    assert problems(report, "dtype")[0]["message"].startswith("pixel dtype float32")


def test_wrong_shape(pcam, small_params):
    x, _ = read(pcam, "test")
    rewrite(pcam, "test", "x", "x", x[:, :64, :64, :])
    [shape] = problems(validate_dir(pcam, small_params.validate_), "shape")
    assert "(32, 64, 64, 3)" in shape["message"] and shape["split"] == "test"


def test_label_outside_zero_one(pcam, small_params):
    _, y = read(pcam, "train")
    y[9] = 2
    rewrite(pcam, "train", "y", "y", y)
    [labels] = problems(validate_dir(pcam, small_params.validate_), "labels")
    assert labels["indices"] == [9] and "[2]" in labels["message"]


def test_mismatched_lengths(pcam, small_params):
    _, y = read(pcam, "valid")
    rewrite(pcam, "valid", "y", "y", y[:-3])
    [mismatch] = problems(validate_dir(pcam, small_params.validate_), "length_mismatch")
    assert "29 labels for 32 patches" in mismatch["message"]


def test_truncated_file(pcam, small_params):
    x_path = split_files(pcam, "train")[0]
    x_path.write_bytes(x_path.read_bytes()[: x_path.stat().st_size // 2])
    [unreadable] = problems(validate_dir(pcam, small_params.validate_), "unreadable")
    assert unreadable["file"] == str(x_path) and "truncated" in unreadable["message"]


def test_missing_key(pcam, small_params):
    x, _ = read(pcam, "test")
    rewrite(pcam, "test", "x", "images", x)
    [missing] = problems(validate_dir(pcam, small_params.validate_), "missing_key")
    assert "'x' not found" in missing["message"] and "images" in missing["message"]


def test_cross_split_duplicate_is_leakage(pcam, small_params):
    train_x, _ = read(pcam, "train")
    test_x, _ = read(pcam, "test")
    test_x[4] = train_x[17]
    rewrite(pcam, "test", "x", "x", test_x)
    report = validate_dir(pcam, small_params.validate_)
    [leak] = problems(report, "leakage")
    assert leak["severity"] == "error" and leak["split"] == "test" and leak["indices"] == [4]
    assert report["leakage"] == {"train/test": 1}


def test_warnings_blank_duplicates_and_balance(pcam, small_params):
    x, y = read(pcam, "train")
    x[0] = 0
    x[1] = 255
    x[2] = x[3]
    y[:] = 1
    rewrite(pcam, "train", "x", "x", x)
    rewrite(pcam, "train", "y", "y", y)
    report = validate_dir(pcam, small_params.validate_)
    assert report["ok"], "warnings only"
    assert {p["check"] for p in report["problems"]} == {"blank", "duplicates", "class_balance"}
    assert problems(report, "blank")[0]["indices"][:2] == [0, 1]


def test_blank_mask():
    x = np.full((3, 96, 96, 3), 128, dtype=np.uint8)
    x[0], x[1] = 3, 250
    assert blank_mask(x, 10, 245).tolist() == [True, True, False]


def test_stage_writes_report_and_fails_with_one_line_per_problem(
    pcam, small_params, monkeypatch, capsys
):
    monkeypatch.chdir(pcam.parent.parent)
    _, y = read(pcam, "train")
    y[9] = 2
    rewrite(pcam, "train", "y", "y", y)
    x, _ = read(pcam, "valid")
    rewrite(pcam, "valid", "x", "x", x.astype(np.int64))
    with pytest.raises(ValidationFailed) as info:
        validate.main(small_params)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith(
        "ERROR data/pcam/camelyonpatch_level_2_split_train_y.h5 [train] "
        "index 9: labels [2] outside {0, 1}. Fix:"
    )
    assert "[valid]" in lines[1] and "int64" in lines[1]
    report = json.loads(Path("reports/validate.json").read_text())
    assert report["ok"] is False and report["errors"] == 2


def test_equal_hashes_are_confirmed_byte_for_byte(pcam, small_params, monkeypatch):
    """Every patch hashing alike (the worst collision case) still reports only true copies."""
    x, _ = read(pcam, "train")
    x[5] = x[40]
    x[41] = x[40]
    x[41, 95, 95, 2] ^= 1  # one bit from a copy: a different patch
    rewrite(pcam, "train", "x", "x", x)
    test_x, _ = read(pcam, "test")
    test_x[6] = x[12]
    rewrite(pcam, "test", "x", "x", test_x)
    honest = validate_dir(pcam, small_params.validate_)

    def one_hash(patches: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return np.zeros(len(patches), dtype=np.uint32)

    monkeypatch.setattr(validate, "patch_hashes", one_hash)
    colliding = validate_dir(pcam, small_params.validate_)
    for report in (honest, colliding):
        assert report["splits"]["train"]["duplicates_within"] == 1
        [leak] = problems(report, "leakage")
        assert leak["indices"] == [6] and report["leakage"] == {"train/test": 1}


def test_patch_hashes_are_stable_and_position_sensitive():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (70, 96, 96, 3), dtype=np.uint8)
    keys = validate.hash_keys(x[0].nbytes)
    hashes = validate.patch_hashes(x, keys)
    assert hashes.dtype == np.uint32 and len(set(hashes.tolist())) == 70
    np.testing.assert_array_equal(validate.patch_hashes(x[::-1].copy(), keys), hashes[::-1])
    swapped = x[:1].copy()
    swapped[0, 0, 0], swapped[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
    assert (swapped != x[:1]).any()
    assert validate.patch_hashes(swapped, keys)[0] != hashes[0], "pixels are not just summed"
    floats = x[:2].astype(np.float32)
    assert len(validate.patch_hashes(floats, validate.hash_keys(floats[0].nbytes))) == 2


def test_compressed_chunked_files_give_the_same_report(pcam, small_params, tmp_path):
    """Files written chunked and gzip-compressed (as some PCAM copies are) are read through h5py
    instead of mapped: the findings must not change."""
    x, _ = read(pcam, "train")
    x[2] = x[3]
    x[0] = 0
    rewrite(pcam, "train", "x", "x", x)
    plain = validate_dir(pcam, small_params.validate_)
    with h5py.File(split_files(pcam, "train")[0], "w") as handle:
        handle.create_dataset("x", data=x, chunks=(8, 96, 96, 3), compression="gzip")
    compressed = validate_dir(pcam, small_params.validate_)
    assert compressed["problems"] == plain["problems"]
    assert compressed["splits"]["train"]["duplicates_within"] == 1


def test_thread_count_does_not_change_the_report(pcam, small_params, monkeypatch):
    test_x, _ = read(pcam, "test")
    train_x, _ = read(pcam, "train")
    test_x[1] = train_x[50]
    rewrite(pcam, "test", "x", "x", test_x)
    params = small_params.validate_.model_copy(update={"block_patches": 7})
    reports = []
    for threads in (1, 3):
        monkeypatch.setattr("pcam_pipeline.data.hdf5.scan_threads", lambda n=threads: n)
        reports.append(validate_dir(pcam, params))
    assert reports[0] == reports[1]
    assert reports[0]["leakage"] == {"train/test": 1}
