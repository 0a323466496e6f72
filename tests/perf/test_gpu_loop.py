"""The GPU loop benchmark's parts that need no GPU: its data (validated and preprocessed as the
stages do, scaled down), its table and its --configs (the timed loops are in
tests/train/test_gpu.py's reach: `scripts/gpu-check.sh` runs both on a GPU node)."""

from __future__ import annotations

import h5py
import pytest

from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.perf import full_size, gpu_loop
from tests.tiny_pipeline import small_run_params


def test_prepare_data_validates_and_preprocesses_a_scaled_down_split(
    tmp_path, make_params, monkeypatch
):
    monkeypatch.setattr(full_size, "BASE_PATCHES", 64)
    monkeypatch.setattr(full_size, "FULL_OTHER_SPLITS", 32)
    params = make_params(validate={"block_patches": 64}, preprocess={"block_patches": 64})
    result = gpu_loop.prepare_data(params, tmp_path, 300)
    assert result["validate_ok"] is True and result["train_patches"] == 300
    assert result["validate_s"] > 0 and result["preprocess_s"] > 0
    dataset = ProcessedData(tmp_path / "processed")
    with h5py.File(dataset.split_path("train"), "r") as handle:
        assert handle["x"].shape == (300, 96, 96, 3)
    assert dataset.stats()["from"] == "train"
    assert not (tmp_path / "pcam").exists(), "the PCAM-format input is removed once processed"


def test_configs_from_the_command_line():
    assert gpu_loop.parse_configs(None) == gpu_loop.CONFIGS
    assert gpu_loop.parse_configs("64:bf16:off,1024:fp32:reduce-overhead") == (
        (64, "bf16", "off"),
        (1024, "fp32", "reduce-overhead"),
    )


def test_table_sets_each_row_beside_the_baseline_and_ddp_beside_the_plain_loop():
    row = {"precision": "bf16", "resident_img_s": 2000.0, "fed_fraction": 0.5}
    result = {
        "loop": [
            {
                **row,
                "batch_size": 64,
                "compile": "off",
                "end_to_end_img_s": 1000.0,
                "pcam_epoch_s": 2.5,
            },
            {"batch_size": 256, "precision": "bf16", "compile": "off", "error": "OutOfMemoryError"},
        ],
        "baseline": [{"batch_size": 64, "img_s": 400.0}],
        "ddp_one_gpu": [{"batch_size": 64, "end_to_end_img_s": 900.0}],
    }
    lines = gpu_loop.table(result).splitlines()
    assert lines[2] == "| 64, bf16, off | 1,000 | 2,000 | 0.50 | 2.50 | 400 |"
    assert lines[3] == "| 256, bf16, off | OutOfMemoryError | | | | |"
    assert lines[-1] == "| 64 | 900 | 1,000 | 0.90 |"


STUB = {
    "__init__.py": "",
    "params.py": """
class Section:
    def __init__(self, **values):
        self.__dict__.update(values)

    def model_copy(self, update):
        return Section(**{**self.__dict__, **update})


def load_params(path):
    return Section(train=Section(batch_size=1, device="cpu", bf16=False))
""",
    # As committed before the training core became a package: trainer.py and preemption.py.
    "preemption.py": "class Preempted(Exception):\n    pass\n",
    "trainer.py": """
import pcam_pipeline
from pcam_pipeline.preemption import Preempted


class Trainer:
    def __init__(self, params):
        assert params.train.device == "cuda" and params.train.bf16, "as a user ran it"
        assert "baseline" in pcam_pipeline.__file__, "the earlier version runs, not this one"

    def train_epoch(self, stop):
        while stop.signal is None:
            pass
        raise Preempted("the stop it asked for")
""",
}


def test_the_baseline_runs_the_earlier_versions_code(tmp_path):
    """`baseline_epoch.py` runs against the earlier checkout's package (here a stand-in with the
    same entry points), whatever this version's package holds."""
    checkout = tmp_path / "baseline"
    for name, text in STUB.items():
        path = checkout / "src" / "pcam_pipeline" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (checkout / "params.yaml").write_text("{}\n")
    rows = gpu_loop.time_baseline(checkout, tmp_path / "processed", tmp_path, steps=5)
    assert [row["batch_size"] for row in rows] == list(gpu_loop.BASELINE_BATCHES)
    assert all(row["img_s"] > 0 for row in rows)


def test_the_timm_rows_time_resnet18_and_resnet50_at_256_bf16_eager_and_compiled():
    params = small_run_params()
    assert gpu_loop.TIMM_MODELS == ("resnet18", "resnet50")
    trains = [
        gpu_loop.cuda_train_params(params, config, name)
        for name in gpu_loop.TIMM_MODELS
        for config in gpu_loop.TIMM_CONFIGS
    ]
    assert {(t.timm.name, t.batch_size, t.bf16, t.compile) for t in trains} == {
        (name, 256, True, mode)
        for name in ("resnet18", "resnet50")
        for mode in ("off", "reduce-overhead")
    }
    assert all(t.model == "timm" and t.device == "cuda" for t in trains)
    row = {"batch_size": 256, "precision": "bf16", "compile": "off", "resident_img_s": 900.0}
    row.update(end_to_end_img_s=800.0, fed_fraction=800 / 900, pcam_epoch_s=327.68)
    text = gpu_loop.table({"loop": [], "loop_resnet50": [row]})
    assert "timm resnet50:\n" in text and "| 256, bf16, off | 800 | 900 | 0.89 | 327.68 |" in text


# --- the course's MIG slice, stood in for by a memory cap (`--mig-cap`) ---------------------------


def test_the_slice_rows_are_cnn_and_resnet18_at_the_course_batches_eager_and_compiled():
    assert gpu_loop.MIG_CAP_GIB == 4.75
    assert {mode for _, _, mode in gpu_loop.MIG_CONFIGS} == {"off", "reduce-overhead"}
    assert sorted({batch for batch, _, _ in gpu_loop.MIG_CONFIGS}) == [1, 64, 256, 1024]
    args = gpu_loop.build_parser().parse_args(["--out", "x.json", "--mig-cap"])
    assert args.mig_cap == 4.75
    assert gpu_loop.build_parser().parse_args(["--out", "x", "--mig-cap", "9.5"]).mig_cap == 9.5
    assert gpu_loop.build_parser().parse_args(["--out", "x"]).mig_cap is None


def test_a_row_says_whether_it_fits_and_its_peak_memory():
    gib = gpu_loop.GIB
    ran = gpu_loop.with_fit(
        {"batch_size": 64, "compile": "off", "end_to_end_img_s": 9000.0}, gib, 2 * gib
    )
    assert ran["fits"] and ran["peak_allocated_gib"] == 1.0 and ran["peak_reserved_gib"] == 2.0
    oom = {
        "batch_size": 1024,
        "compile": "reduce-overhead",
        "oom": 1,
        "error": "out of memory: CUDA",
    }
    assert not gpu_loop.with_fit(oom, 4 * gib, 4 * gib)["fits"]
    other = gpu_loop.with_fit({"batch_size": 1, "compile": "off", "error": "ValueError: x"}, 0, 0)
    assert other["fits"], "an error other than memory says nothing about fitting"
    lines = gpu_loop.slice_lines([ran, gpu_loop.with_fit(oom, 4 * gib, 4 * gib)])
    assert "9,000" in lines[1] and "yes" in lines[1] and "NO" in lines[2]


def test_the_loader_decides_as_on_a_device_of_the_capped_size():
    """The loader reads the whole GPU's free memory, which the cap does not lower: its share is
    scaled so the split goes to the device only when it fits the slice's."""
    params = small_run_params()
    gib = gpu_loop.GIB
    capped = gpu_loop.capped_loader(params, int(4.75 * gib), 80 * gib, 80 * gib)
    budget = capped.loader.device_memory_fraction * 80 * gib
    assert budget == pytest.approx(params.loader.device_memory_fraction * 4.75 * gib)
    assert capped.train == params.train
