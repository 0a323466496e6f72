"""Faults a user meets, run as the user runs them (`pcam <command>` in a process of its own):
each ends in one line `error: ...` on stderr naming the file and the fix, a non-zero exit
status (never a signal: a segmentation fault is -11), no traceback, and nothing lost.

1. models/last.pt cut short, empty or not a checkpoint: moved aside, the next run trains afresh
   (and bytes changed inside a tensor are found, by the archive's CRCs).
2. last.pt holding pickled code: refused (nothing of it runs) and moved aside; an unloadable
   best.pt in evaluate and predict is named with the fix (and left where DVC keeps it).
3. A disk too small for preprocess: refused before writing; one that fills up while it writes
   (no segmentation fault); the same check for fetch's copy and for a download.
4. `pcam predict` on a file that is neither HDF5 nor PNG.
5. A split that preprocess empties (all blank) or leaves with one class; train inputs it cannot
   use; a training run in which no epoch could be kept as best.
6. validate logs fatal problems at ERROR, warnings at WARNING.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pcam_pipeline.data.pcam import split_files
from pcam_pipeline.errors import DamagedCheckpoint
from pcam_pipeline.train.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT
from tests.http_server import Behaviour, gzip_files, serve
from tests.integration.conftest import require_integration
from tests.pcam_files import make_pcam_dir, read, rewrite
from tests.tiny_pipeline import write_params_file, write_tiny_dataset

STAMP = r"\d{8}T\d{6}Z"  # UTC, as the moved-aside names carry it


def run_cli(
    args: list[str], cwd: Path, data_dir: Path | None = None, *, program: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`pcam ARGS` in `cwd` as a user runs it (train and evaluate read `data_dir`), stdout and
    stderr apart. `program`: the interpreter's arguments to run instead of the CLI (a driver)."""
    env = {**os.environ, "PCAM_TRAIN_DATA_DIR": str(data_dir or cwd)}
    command = [sys.executable, *(program or ["-m", "pcam_pipeline.cli"]), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def error_line(result: subprocess.CompletedProcess, *mentions: str) -> str:
    """The one `error: ` line of a command that failed cleanly, holding every one of `mentions`."""
    output = result.stdout + result.stderr
    assert result.returncode > 0, f"exit status {result.returncode} (a signal?):\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for mention in mentions:
        assert mention in errors[0], errors[0]
    return errors[0]


def md5s(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def git_ignores(relative: str) -> bool:
    result = subprocess.run(
        ["git", "check-ignore", "-q", relative], cwd=REPO_ROOT, capture_output=True, timeout=30
    )
    return result.returncode == 0


class CodeInPickle:
    """Unpickling this runs a shell command: the payload a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def run_dir(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of a finished small run (models/, params.yaml) to break things in."""
    shutil.copytree(trained_run / "models", tmp_path / "models")
    write_params_file(tmp_path)
    return tmp_path


def damage(path: Path, how: str) -> bytes:
    """Damage the checkpoint `path` as `how` says; its bytes afterwards."""
    original = path.read_bytes()
    damaged = {
        "cut in half": original[: len(original) // 2],  # an interrupted copy
        "empty": b"",
        "text": b"checkpoint went here\n",
    }[how]
    path.write_bytes(damaged)
    return damaged


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """data/pcam (64/32/32 synthetic patches) and params.yaml: a project before preprocess."""
    make_pcam_dir(tmp_path / "data" / "pcam")
    write_params_file(tmp_path)
    return tmp_path


def processed_files(project: Path) -> list[str]:
    directory = project / "data" / "processed"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- 1. and 2.: checkpoints that cannot be loaded -----------------------------------------------


def test_a_cut_short_last_pt_is_moved_aside_and_the_next_run_trains_afresh(run_dir, tiny_data):
    left = damage(run_dir / "models" / "last.pt", "cut in half")
    result = run_cli(["train"], run_dir, tiny_data)
    line = error_line(
        result, "models/last.pt was damaged (", "run the stage again (`dvc repro`) to train afresh"
    )
    [moved] = list((run_dir / "models").glob("last.pt.damaged-*"))
    assert re.fullmatch(f"last.pt.damaged-{STAMP}", moved.name)
    assert f"moved to models/{moved.name};" in line
    assert moved.read_bytes() == left, "kept as it was, not deleted"
    assert not (run_dir / "models" / "last.pt").exists()
    assert "WARNING pcam_pipeline.train.resume: models/last.pt was damaged" in result.stderr
    assert git_ignores(f"models/{moved.name}"), "git status stays clean"

    again = run_cli(["train"], run_dir, tiny_data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting at epoch 1 batch 0" in again.stderr
    assert (run_dir / "models" / "last.pt").exists() and moved.read_bytes() == left


@pytest.mark.parametrize("how", ["empty", "text"])
def test_an_empty_or_foreign_last_pt_is_moved_aside(run_dir, tiny_data, how):
    left = damage(run_dir / "models" / "last.pt", how)
    error_line(run_cli(["train"], run_dir, tiny_data), "models/last.pt was damaged (")
    [moved] = list((run_dir / "models").glob("last.pt.damaged-*"))
    assert moved.read_bytes() == left


def test_bytes_changed_inside_a_tensor_make_a_damaged_checkpoint(run_dir):
    """Bit rot in the weights: torch loads it without a word; the archive's CRC says so."""
    path = run_dir / "models" / "last.pt"
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        record = max(tensors, key=lambda info: info.file_size)  # the largest tensor
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)  # the local header's name and extra lengths
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0xFF]))
    torch.load(path, weights_only=True)  # what the loader alone makes of it
    with pytest.raises(DamagedCheckpoint, match=f"CRC of its record {record.filename} does not"):
        load_checkpoint(path)


def test_a_last_pt_holding_code_is_refused_and_moved_aside(run_dir, tiny_data):
    marker = run_dir / "payload-ran"
    last = run_dir / "models" / "last.pt"
    torch.save({"format": 1, "model": CodeInPickle(marker)}, last)
    evil = last.read_bytes()
    line = error_line(
        run_cli(["train"], run_dir, tiny_data),
        "models/last.pt: refused to load: it holds objects other than tensors and plain data",
        "GLOBAL posix.system",
    )
    [moved] = list((run_dir / "models").glob("last.pt.refused-*"))
    assert re.fullmatch(f"last.pt.refused-{STAMP}", moved.name)
    assert f"moved to models/{moved.name}; run the stage again" in line
    assert moved.read_bytes() == evil
    assert not marker.exists(), "the checkpoint's code ran"
    assert git_ignores(f"models/{moved.name}")


@pytest.mark.parametrize("how", ["cut in half", "code"])
def test_evaluate_names_an_unloadable_best_pt_and_leaves_it(run_dir, tiny_data, how):
    best = run_dir / "models" / "best.pt"
    if how == "code":
        torch.save({"model": CodeInPickle(run_dir / "payload-ran")}, best)
    else:
        damage(best, how)
    left = best.read_bytes()
    error_line(
        run_cli(["evaluate"], run_dir, tiny_data),
        "models/best.pt: ",
        "`dvc repro train`",
        "`dvc checkout models/best.pt`",
    )
    assert best.read_bytes() == left, "a DVC output: named, not moved"
    assert not (run_dir / "reports" / "metrics.json").exists()
    assert not (run_dir / "payload-ran").exists()


@pytest.mark.parametrize("how", ["cut in half", "code"])
def test_predict_names_an_unloadable_checkpoint(run_dir, tiny_data, how):
    checkpoint = run_dir / "handed-over.pt"
    if how == "code":
        torch.save({"model": CodeInPickle(run_dir / "payload-ran")}, checkpoint)
    else:
        checkpoint.write_bytes((run_dir / "models" / "best.pt").read_bytes())
        damage(checkpoint, how)
    result = run_cli(
        ["predict", "handed-over.pt", str(tiny_data / "test.h5"), "--out", "p.csv"], run_dir
    )
    error_line(result, "handed-over.pt: ", "give a checkpoint written by `pcam train`")
    assert not (run_dir / "p.csv").exists()


# --- 3.: a disk too small, or one that fills up -------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], Path]]:
    """`mount(directory, kilobytes)`: a tmpfs of that size at `directory` (a real, small file
    system; needs root), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(directory: Path, kilobytes: int) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(directory)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            require_integration("no `mount` command: cannot make a small file system")
        if result.returncode != 0:
            require_integration(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", str(directory)], check=True, timeout=30)


def random_train_split(pcam_dir: Path) -> None:
    """Noise for patches: no compression shrinks it, so a compressed write fills a disk too."""
    x, _ = read(pcam_dir, "train")
    noise = np.random.default_rng(3).integers(0, 256, x.shape, dtype=np.uint8)
    rewrite(pcam_dir, "train", "x", "x", noise)


def test_preprocess_refuses_to_start_on_a_disk_too_small(project, small_disk):
    processed = small_disk(project / "data" / "processed", 1024)
    before = md5s(project / "data" / "pcam")
    error_line(
        run_cli(["preprocess"], project),
        "data/processed needs about ",
        f"but the file system at {processed} has 1.0 MB free; nothing was written",
        "free space there",
    )
    assert processed_files(project) == []
    assert md5s(project / "data" / "pcam") == before


# The free-space check, patched out: the disk fills up during the write, as when another job
# fills it after the check.
WITHOUT_SPACE_CHECK = [
    "-c",
    "import sys; from pcam_pipeline import cli; from pcam_pipeline.data import prepare; "
    "prepare.check_free_space = lambda *args: None; sys.exit(cli.main(sys.argv[1:]))",
]


@pytest.mark.parametrize(
    "layout, compression, chunk_patches",
    # written in order by the writer itself; a chunk larger than the disk; chunks cached until
    # the close
    [("contiguous", "none", 64), ("chunked", "none", 64), ("chunked", "lzf", 16)],
)
def test_a_disk_that_fills_up_during_preprocess_fails_cleanly(
    project, small_disk, layout, compression, chunk_patches
):
    random_train_split(project / "data" / "pcam")
    write_params_file(
        project,
        preprocess={"layout": layout, "compression": compression, "chunk_patches": chunk_patches},
    )
    processed = small_disk(project / "data" / "processed", 1024)
    before = md5s(project / "data" / "pcam")
    # Compressed output has no size to check in advance: the real command meets the full disk.
    driver = WITHOUT_SPACE_CHECK if compression == "none" else None
    result = run_cli(["preprocess"], project, program=driver)
    error_line(
        result,
        f"data/processed/train.h5: the file system at {processed} (1.0 MB in all) filled up "
        "while it was written (No space left on device)",
        "nothing was written under its final name",
    )
    assert processed_files(project) == [], "the partial file is removed"
    assert md5s(project / "data" / "pcam") == before


def test_fetch_copy_refuses_to_start_on_a_disk_too_small(tmp_path, small_disk):
    shared = make_pcam_dir(tmp_path / "shared")
    checksums = tmp_path / "md5.txt"
    checksums.write_text("".join(f"{md5}  {name}\n" for name, md5 in md5s(shared).items()))
    project = tmp_path / "project"
    project.mkdir()
    source = {"source": "path", "input": str(shared), "link": "copy", "checksums": str(checksums)}
    write_params_file(project, fetch=source)
    target = small_disk(project / "data" / "pcam", 1024)
    before = md5s(shared)
    error_line(
        run_cli(["fetch"], project),
        "data/pcam needs about ",
        f"the file system at {target} has 1.0 MB free",
        "fetch.link: hardlink",
    )
    assert sorted(p.name for p in target.iterdir()) == []
    assert md5s(shared) == before


def test_download_refuses_a_file_larger_than_the_free_space(tmp_path, small_disk):
    release = make_pcam_dir(tmp_path / "release", {"train": 64, "valid": 16, "test": 16})
    random_train_split(release)  # the .gz stays as large as the file
    raw = small_disk(tmp_path / "raw", 1024)
    with serve(Behaviour(files=gzip_files(release))) as url:
        release_md5s = str(REPO_ROOT / "data" / "pcam.md5")
        write_params_file(tmp_path, fetch={"zenodo_url": url, "checksums": release_md5s})
        result = run_cli(["download", "--dir", str(raw)], tmp_path)
    partial = raw / f".{split_files(raw, 'train')[0].name}.gz.part"
    error_line(result, f"{partial} needs about ", "has 1.0 MB free; nothing was written")
    assert sorted(p.name for p in raw.iterdir()) == [], "no partial download of the large file"


# --- 4.: predict on a file that is neither HDF5 nor PNG -----------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "patches.h5"])
def test_predict_names_an_input_that_is_not_hdf5_or_png(run_dir, name):
    (run_dir / name).write_text("these are my notes, not patches\n")
    result = run_cli(["predict", "models/best.pt", name, "--out", "p.csv"], run_dir)
    error_line(result, f"{name}: not an HDF5 file or PNG image (", "give one HDF5 file")
    assert not (run_dir / "p.csv").exists()


# --- 5.: splits no training can use -------------------------------------------------------------


def test_preprocess_fails_on_a_split_it_would_empty(project):
    pcam_dir = project / "data" / "pcam"
    x, _ = read(pcam_dir, "valid")
    rewrite(pcam_dir, "valid", "x", "x", np.full_like(x, 255))  # all-white glass
    assert run_cli(["validate"], project).returncode == 0, "blank patches are only a warning"
    before = md5s(pcam_dir)
    error_line(
        run_cli(["preprocess"], project),
        "camelyonpatch_level_2_split_valid_x.h5 [valid]: all 32 patches are blank",
        "leaves the valid split empty",
        "preprocess.drop_blank: false",
    )
    assert processed_files(project) == [], "nothing under a final name, no temporary file"
    assert md5s(pcam_dir) == before


def test_preprocess_fails_on_a_split_left_with_one_class(project):
    pcam_dir = project / "data" / "pcam"
    x, y = read(pcam_dir, "test")
    x[y.reshape(-1) == 1] = 0  # every tumour patch is black: dropped as blank
    rewrite(pcam_dir, "test", "x", "x", x)
    error_line(
        run_cli(["preprocess"], project),
        "camelyonpatch_level_2_split_test_y.h5 [test]: after dropping",
        "labels are 0 (normal): one class only",
        "validate.allow_single_class: true",
    )
    assert processed_files(project) == []
    # Allowed, as validate allows it: a warning, and the split is written.
    write_params_file(project, validate={"allow_single_class": True})
    allowed = run_cli(["preprocess"], project)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "one class only in the split (allowed by validate.allow_single_class)" in allowed.stderr
    assert "test.h5" in processed_files(project)


@pytest.mark.parametrize("fault", ["one class", "empty"])
def test_train_refuses_a_validation_split_it_cannot_score(tmp_path, fault):
    data = write_tiny_dataset(tmp_path / "processed", {"train": 64, "valid": 16, "test": 16})
    with h5py.File(data / "valid.h5", "a") as handle:
        if fault == "one class":
            handle["y"][...] = 0
        else:
            for key in ("x", "y", "index"):
                handle[key].resize(0, axis=0)
    write_params_file(tmp_path)
    mentions = {
        "one class": [
            "holds one class only (all 16 labels are 0)",
            "train.select_metric: val_loss",
        ],
        "empty": ["the valid split is empty (0 patches)", "dvc repro preprocess"],
    }[fault]
    error_line(run_cli(["train"], tmp_path, data), f"{data / 'valid.h5'}: ", *mentions)
    assert not (tmp_path / "models" / "best.pt").exists()


def test_a_run_in_which_no_epoch_can_be_best_says_why(tiny_data, tmp_path):
    # Plain SGD at lr 1e12 without clipping: the weights are NaN after the first steps.
    diverging = {"lr": 1e12, "optimizer": "sgd", "grad_clip": 0, "warmup_epochs": 0, "epochs": 1}
    write_params_file(tmp_path, train=diverging)
    error_line(
        run_cli(["train"], tmp_path, tiny_data),
        "no epoch improved val_auroc: it was NaN in all 1 epochs (training diverged",
        "nothing was saved as models/best.pt",
        "lower train.lr",
    )


# --- 6.: validate's log levels ------------------------------------------------------------------


def test_validate_logs_fatal_problems_as_errors_and_warnings_as_warnings(project):
    pcam_dir = project / "data" / "pcam"
    _, y = read(pcam_dir, "train")
    y[9] = 2
    rewrite(pcam_dir, "train", "y", "y", y)
    x, _ = read(pcam_dir, "valid")
    x[3] = 255
    rewrite(pcam_dir, "valid", "x", "x", x)
    result = run_cli(["validate"], project)
    error_line(result, "1 fatal problem(s) in data/pcam")
    logged = result.stderr.splitlines()
    stage = "pcam_pipeline.stages.validate: "
    fatal = f"ERROR {stage}ERROR data/pcam/camelyonpatch_level_2_split_train_y.h5 [train]"
    warned = f"WARNING {stage}WARNING data/pcam/camelyonpatch_level_2_split_valid_x.h5 [valid]"
    assert any(line.startswith(fatal) for line in logged), result.stderr
    assert any(line.startswith(warned) for line in logged), result.stderr
    assert not [line for line in logged if line.startswith(f"WARNING {stage}ERROR")]
