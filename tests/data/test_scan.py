"""validate's pass over the pixels (data/scan.py): hashes, duplicates confirmed byte for byte,
and findings that do not depend on threads, block size or the file's layout."""

import h5py
import numpy as np

from pcam_pipeline.data import scan
from pcam_pipeline.data.pcam import split_files
from pcam_pipeline.data.validation import validate_dir
from tests.pcam_files import problems, read, rewrite, write_corrupt_chunk


def test_patch_hashes_are_stable_and_position_sensitive():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (70, 96, 96, 3), dtype=np.uint8)
    keys = scan.hash_keys(x[0].nbytes)
    hashes = scan.patch_hashes(x, keys)
    assert hashes.dtype == np.uint32 and len(set(hashes.tolist())) == 70
    np.testing.assert_array_equal(scan.patch_hashes(x[::-1].copy(), keys), hashes[::-1])
    swapped = x[:1].copy()
    swapped[0, 0, 0], swapped[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
    assert (swapped != x[:1]).any()
    assert scan.patch_hashes(swapped, keys)[0] != hashes[0], "pixels are not just summed"
    floats = x[:2].astype(np.float32)
    assert len(scan.patch_hashes(floats, scan.hash_keys(floats[0].nbytes))) == 2


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

    monkeypatch.setattr(scan, "patch_hashes", one_hash)
    colliding = validate_dir(pcam, small_params.validate_)
    for report in (honest, colliding):
        assert report["splits"]["train"]["duplicates_within"] == 1
        [leak] = problems(report, "leakage")
        assert leak["indices"] == [6] and report["leakage"] == {"train/test": 1}


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
        monkeypatch.setattr("pcam_pipeline.data.block_scan.scan_threads", lambda n=threads: n)
        reports.append(validate_dir(pcam, params))
    assert reports[0] == reports[1]
    assert reports[0]["leakage"] == {"train/test": 1}


def test_corrupt_chunk_in_a_later_block_with_threads(pcam, small_params, monkeypatch):
    """The failing block is found in file order whatever the threads: blocks of 5 patches, 3
    threads, the damage in rows 40..47."""
    x, _ = read(pcam, "train")
    write_corrupt_chunk(split_files(pcam, "train")[0], "x", x, chunk_rows=8, bad_chunk=5)
    monkeypatch.setattr("pcam_pipeline.data.block_scan.scan_threads", lambda: 3)
    params = small_params.validate_.model_copy(update={"block_patches": 5})
    [corrupt] = problems(validate_dir(pcam, params), "corrupt")
    assert corrupt["indices"][0] == 40 and "patches 40..47 cannot be read" in corrupt["message"]
