import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcam_pipeline.data.pcam import split_files
from pcam_pipeline.data.prepare import to_uint8
from pcam_pipeline.stages import preprocess
from tests.pcam_files import make_pcam_dir, read, rewrite


@pytest.fixture
def project(in_tmp_project: Path) -> Path:
    make_pcam_dir(in_tmp_project / "data" / "pcam")
    return in_tmp_project


def test_clip_then_cast():
    values = np.array([-4.0, 0.0, 12.6, 255.0, 300.0, np.nan])
    assert to_uint8(values).tolist() == [0, 0, 12, 255, 255, 0]
    wide = np.array([70000, 256, 3], dtype=np.uint32)
    assert to_uint8(wide).tolist() == [255, 255, 3], "clipped, never wrapped around"


def test_processed_layout_blank_filter_and_report(project, small_params):
    x, y = read(project / "data" / "pcam", "train")
    x[5], x[6] = 0, 255
    rewrite(project / "data" / "pcam", "train", "x", "x", x)
    preprocess.main(small_params)
    with h5py.File("data/processed/train.h5", "r") as handle:
        assert handle["x"].dtype == np.uint8 and handle["x"].shape == (62, 96, 96, 3)
        assert handle["x"].chunks is None, "contiguous: written once, in file order"
        assert handle["x"].compression is None
        assert 5 not in handle["index"][...] and 6 not in handle["index"][...]
        np.testing.assert_array_equal(handle["y"][...], y.reshape(-1)[handle["index"][...]])
        np.testing.assert_array_equal(handle["x"][...], x[handle["index"][...]])
    report = json.loads(Path("reports/preprocess.json").read_text())
    assert report["train"]["blank_indices"] == [5, 6]
    assert report["train"]["n_in"] == 64 and report["train"]["n_out"] == 62
    assert report["valid"]["blank_removed"] == 0


def test_stats_come_from_train_only(project, small_params):
    preprocess.main(small_params)
    stats = json.loads(Path("data/processed/stats.json").read_text())
    with h5py.File("data/processed/train.h5", "r") as handle:
        train = handle["x"][...].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["mean"], train.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], train.std(axis=0), rtol=1e-6)
    # Changing the test split does not move the statistics.
    x, _ = read(project / "data" / "pcam", "test")
    rewrite(project / "data" / "pcam", "test", "x", "x", (x // 2).astype(np.uint8))
    preprocess.main(small_params)
    assert json.loads(Path("data/processed/stats.json").read_text()) == stats


def test_wide_dtype_is_repaired_and_recorded(project, small_params):
    x, _ = read(project / "data" / "pcam", "valid")
    wide = x.astype(np.int64)
    wide[2, 0, 0, 0] = 999
    rewrite(project / "data" / "pcam", "valid", "x", "x", wide)
    preprocess.main(small_params)
    report = json.loads(Path("reports/preprocess.json").read_text())
    assert report["valid"]["cast_from"] == "int64" and report["valid"]["clipped"] == 1
    with h5py.File("data/processed/valid.h5", "r") as handle:
        assert handle["x"][2, 0, 0, 0] == 255


def test_compression_option(project, make_params):
    params = make_params(
        preprocess={"layout": "chunked", "compression": "lzf", "chunk_patches": 16}
    )
    preprocess.main(params)
    with h5py.File("data/processed/test.h5", "r") as handle:
        assert handle["x"].compression == "lzf" and handle["x"].chunks[0] == 16


def test_threads_and_source_layout_do_not_change_the_output(project, small_params, monkeypatch):
    """One thread or three, a mapped source or a gzip-compressed one read through h5py: the same
    processed patches, labels, indices and statistics."""
    pcam = project / "data" / "pcam"
    x, _ = read(pcam, "train")
    x[9] = 0  # a blank patch in the middle of a block
    rewrite(pcam, "train", "x", "x", x)
    params = small_params.model_copy(
        update={"preprocess": small_params.preprocess.model_copy(update={"block_patches": 10})}
    )

    def run(threads: int) -> tuple[dict[str, np.ndarray], str]:
        monkeypatch.setattr("pcam_pipeline.data.block_scan.scan_threads", lambda: threads)
        preprocess.main(params)
        with h5py.File("data/processed/train.h5", "r") as handle:
            arrays = {key: handle[key][...] for key in ("x", "y", "index")}
        return arrays, Path("data/processed/stats.json").read_text()

    single, stats = run(1)
    assert 9 not in single["index"]
    with h5py.File(split_files(pcam, "train")[0], "w") as handle:
        handle.create_dataset("x", data=x, chunks=(4, 96, 96, 3), compression="gzip")
    for threads in (3, 1):
        arrays, other_stats = run(threads)
        assert other_stats == stats
        for key, values in single.items():
            np.testing.assert_array_equal(arrays[key], values)
