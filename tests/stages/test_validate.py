"""The validate stage as a user runs it: reports/validate.json, one line per problem, the exit
status, and no traceback for any malformed input."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pcam_pipeline import cli
from pcam_pipeline.data.pcam import split_files
from pcam_pipeline.stages import validate
from pcam_pipeline.stages.validate import ValidationFailed
from tests.pcam_files import problems, read, rewrite, set_x, set_y, with_value, write_corrupt_chunk


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


# Malformed inputs through the real entry point: each must end in `error: ...` on stderr naming
# the file and the fix, a non-zero exit and reports/validate.json, never a traceback.


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
