"""validate's checks over the facts of a split and across splits (data/checks.py), on small
PCAM-format files with bad data planted."""

import numpy as np

from pcam_pipeline.data.pcam import blank_mask, split_files
from pcam_pipeline.data.validation import validate_dir
from tests.pcam_files import problems, read, rewrite, set_x, with_value


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
    y[10] = 0  # both classes, badly imbalanced: one class only would be fatal
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


def test_allow_unsafe_dtype_does_not_pass_scaled_or_negative_pixels(pcam, small_params):
    """Clipping to [0, 255] and casting cannot repair a [0, 1] or a normalised image."""
    set_x(pcam, "valid", lambda x: x.astype(np.float32) / 255)
    set_x(pcam, "test", lambda x: with_value(x, np.int16, (2, 0, 0, 0), -1))
    relaxed = small_params.validate_.model_copy(update={"allow_unsafe_dtype": True})
    report = validate_dir(pcam, relaxed)
    errors = {(p["split"], p["check"]) for p in report["problems"] if p["severity"] == "error"}
    assert errors == {("valid", "scaled"), ("test", "negative")}
