import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pcam_pipeline import cli
from pcam_pipeline.data.pcam import blank_mask, split_files
from pcam_pipeline.stages import validate
from pcam_pipeline.stages.validate import ValidationFailed, validate_dir
from tests.pcam_files import make_pcam_dir, read, rewrite, write_corrupt_chunk


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


# Malformed inputs through the real entry point: each must end in `error: ...` on stderr naming
# the file and the fix, a non-zero exit and reports/validate.json, never a traceback.


def set_x(pcam: Path, split: str, change) -> None:
    x, _ = read(pcam, split)
    rewrite(pcam, split, "x", "x", change(x))


def set_y(pcam: Path, split: str, change) -> None:
    _, y = read(pcam, split)
    rewrite(pcam, split, "y", "y", change(y))


def with_value(array: np.ndarray, dtype, index: tuple, value) -> np.ndarray:
    changed = array.astype(dtype)
    changed[index] = value
    return changed


def empty_split(pcam: Path) -> None:
    set_x(pcam, "valid", lambda x: x[:0])
    set_y(pcam, "valid", lambda y: y[:0])


def write_group(pcam: Path, split: str, part: str, members: int) -> None:
    path = split_files(pcam, split)[0 if part == "x" else 1]
    with h5py.File(path, "w") as handle:
        group = handle.create_group(part)
        for i in range(members):
            group.create_dataset(f"block{i}", data=np.zeros(4, dtype=np.uint8))


def corrupt_x_chunk(pcam: Path) -> None:
    x, _ = read(pcam, "train")
    path = split_files(pcam, "train")[0]
    write_corrupt_chunk(path, "x", x, chunk_rows=8, bad_chunk=1)
    with h5py.File(path, "r") as handle:
        handle["x"][:8]  # the other chunks still read
        with pytest.raises(OSError):
            handle["x"][8:16]


def corrupt_y_chunk(pcam: Path) -> None:
    _, y = read(pcam, "test")
    write_corrupt_chunk(split_files(pcam, "test")[1], "y", y, chunk_rows=16, bad_chunk=0)


X, Y = "camelyonpatch_level_2_split_{}_x.h5", "camelyonpatch_level_2_split_{}_y.h5"
MALFORMED = {
    # case: (plant it, file, split, check, expected start of the line after the file, the fix)
    "empty_split": (
        empty_split,
        X,
        "valid",
        "empty",
        ": an empty split: 0 patches (shape (0, 96, 96, 3))",
        "every split needs patches of both classes",
    ),
    "single_class_train": (
        lambda pcam: set_y(pcam, "train", lambda y: np.ones_like(y)),
        Y,
        "train",
        "single_class",
        ": all 64 labels are 1 (tumour): one class only in the split",
        "set validate.allow_single_class: true",
    ),
    "single_class_valid": (
        lambda pcam: set_y(pcam, "valid", np.zeros_like),
        Y,
        "valid",
        "single_class",
        ": all 32 labels are 0 (normal): one class only in the split",
        "a split needs both classes",
    ),
    "single_class_test": (
        lambda pcam: set_y(pcam, "test", np.zeros_like),
        Y,
        "test",
        "single_class",
        ": all 32 labels are 0 (normal)",
        "re-create it from the whole split",
    ),
    "float_labels": (
        lambda pcam: set_y(pcam, "train", lambda y: y.astype(np.float32)),
        Y,
        "train",
        "label_dtype",
        ": label dtype float32, expected an integer dtype",
        "store the labels as uint8 0/1",
    ),
    "nan_labels": (
        lambda pcam: set_y(pcam, "train", lambda y: with_value(y, np.float64, 5, np.nan)),
        Y,
        "train",
        "labels",
        " index 5: NaN labels (1 of 64)",
        "PCAM labels are 0 (normal) or 1",
    ),
    "negative_labels": (
        lambda pcam: set_y(pcam, "valid", lambda y: with_value(y, np.int8, 3, -1)),
        Y,
        "valid",
        "labels",
        " index 3: labels [-1] outside {0, 1}",
        "relabel or drop these",
    ),
    "missing_y_key": (
        lambda pcam: rewrite(pcam, "train", "y", "labels", read(pcam, "train")[1]),
        Y,
        "train",
        "missing_key",
        ": dataset key 'y' not found (keys: ['labels'])",
        "store the labels under key 'y'",
    ),
    "x_is_a_group": (
        lambda pcam: write_group(pcam, "test", "x", 2),
        X,
        "test",
        "not_dataset",
        ": 'x' is an HDF5 group holding ['block0', 'block1'], not a dataset",
        "store the patches as one dataset under key 'x', not a group",
    ),
    "y_is_a_group": (
        lambda pcam: write_group(pcam, "train", "y", 0),
        Y,
        "train",
        "not_dataset",
        ": 'y' is an HDF5 group (empty), not a dataset",
        "store the labels as one dataset under key 'y'",
    ),
    "negative_pixels": (
        lambda pcam: set_x(pcam, "train", lambda x: with_value(x, np.int16, (7, 1, 2, 0), -4)),
        X,
        "train",
        "negative",
        " index 7: negative pixel values (min -4.0)",
        "store the raw image, uint8 0..255",
    ),
    "scaled_float_pixels": (
        lambda pcam: set_x(pcam, "valid", lambda x: x.astype(np.float32) / 255),
        X,
        "valid",
        "scaled",
        ": float pixels all within [",
        "multiply by 255 and store as uint8",
    ),
    "minus_inf_pixels": (
        lambda pcam: set_x(
            pcam, "test", lambda x: with_value(x, np.float32, (9, 0, 0, 2), -np.inf)
        ),
        X,
        "test",
        "nonfinite",
        " index 9: pixels are not finite (NaN, +Inf or -Inf)",
        "drop or repair these patches",
    ),
    "corrupt_x_chunk": (
        corrupt_x_chunk,
        X,
        "train",
        "corrupt",
        " index 8 (+7 more): patches 8..15 cannot be read (",
        "re-run `dvc repro fetch`",
    ),
    "corrupt_y_chunk": (
        corrupt_y_chunk,
        Y,
        "test",
        "corrupt",
        ": labels cannot be read (",
        "re-run `dvc repro fetch`",
    ),
}


def run_validate(project: Path, make_params, capsys, **validate) -> tuple[int, str]:
    """`pcam --params <file> validate` in `project`; the exit code and everything printed."""
    params = make_params(validate={"block_patches": 7, **validate})  # blocks cross chunks
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.as_dict()))
    code = cli.main(["--params", str(params_file), "validate"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_input_is_an_error_line_not_a_traceback(
    case, pcam, make_params, monkeypatch, capsys
):
    plant, file, split, check, message, fix = MALFORMED[case]
    plant(pcam)
    monkeypatch.chdir(pcam.parent.parent)
    code, output = run_validate(pcam.parent.parent, make_params, capsys)
    assert code == 1
    assert "Traceback" not in output
    assert "\nerror: " in "\n" + output
    where = f"ERROR data/pcam/{file.format(split)} [{split}]"
    [line] = [line for line in output.splitlines() if line.startswith(where + message)]
    assert fix in line.split(". Fix: ", 1)[1]
    report = json.loads(Path("reports/validate.json").read_text())
    assert check in {p["check"] for p in report["problems"] if p["severity"] == "error"}


def test_single_class_allowed_is_a_warning(pcam, make_params, monkeypatch, capsys):
    set_y(pcam, "test", np.zeros_like)
    monkeypatch.chdir(pcam.parent.parent)
    code, output = run_validate(pcam.parent.parent, make_params, capsys, allow_single_class=True)
    assert code == 0 and "error:" not in output
    report = json.loads(Path("reports/validate.json").read_text())
    [single] = problems(report, "single_class")
    assert single["severity"] == "warning" and single["split"] == "test"
    assert not problems(report, "class_balance"), "one line for one fact"


def test_allow_unsafe_dtype_does_not_pass_scaled_or_negative_pixels(pcam, small_params):
    """Clipping to [0, 255] and casting cannot repair a [0, 1] or a normalised image."""
    set_x(pcam, "valid", lambda x: x.astype(np.float32) / 255)
    set_x(pcam, "test", lambda x: with_value(x, np.int16, (2, 0, 0, 0), -1))
    relaxed = small_params.validate_.model_copy(update={"allow_unsafe_dtype": True})
    report = validate_dir(pcam, relaxed)
    errors = {(p["split"], p["check"]) for p in report["problems"] if p["severity"] == "error"}
    assert errors == {("valid", "scaled"), ("test", "negative")}


def test_corrupt_chunk_in_a_later_block_with_threads(pcam, small_params, monkeypatch):
    """The failing block is found in file order whatever the threads: blocks of 5 patches, 3
    threads, the damage in rows 40..47."""
    x, _ = read(pcam, "train")
    write_corrupt_chunk(split_files(pcam, "train")[0], "x", x, chunk_rows=8, bad_chunk=5)
    monkeypatch.setattr("pcam_pipeline.data.hdf5.scan_threads", lambda: 3)
    params = small_params.validate_.model_copy(update={"block_patches": 5})
    [corrupt] = problems(validate_dir(pcam, params), "corrupt")
    assert corrupt["indices"][0] == 40 and "patches 40..47 cannot be read" in corrupt["message"]


def test_empty_split_from_the_command_line(pcam, make_params):
    """The reported bug, as a user meets it: a real `pcam validate` process."""
    empty_split(pcam)
    project = pcam.parent.parent
    (project / "params.yaml").write_text(yaml.safe_dump(make_params().as_dict()))
    result = subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.cli", "validate"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr
    assert "ERROR data/pcam/camelyonpatch_level_2_split_valid_x.h5 [valid]: an empty split" in (
        result.stderr
    )
