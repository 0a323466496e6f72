"""export_bench: the exported model against torch on this CPU, parity and speed side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pcam_pipeline.paths import EXPORT_BENCH_FILE
from pcam_pipeline.stages import export_bench
from tests.tiny_pipeline import small_run_params, workdir


@pytest.fixture
def measured(exported_run: Path, tiny_data: Path, tmp_path: Path) -> dict:
    run = shutil.copytree(exported_run, tmp_path / "run")
    params = small_run_params(export_bench={"batch_sizes": [1, 8], "rounds": 3})
    with workdir(run, tiny_data):
        export_bench.main(params)
        return json.loads(EXPORT_BENCH_FILE.read_text())


def test_parity_is_measured_on_the_whole_test_split(measured):
    parity = measured["parity"]
    assert parity["test_patches"] == 64
    assert parity["fp32_max_abs_delta_p"] <= 1e-5 and parity["fp32_decisions_differing"] == 0
    assert 0.5 < parity["int8_auroc"] <= 1 and 0.5 < parity["fp32_auroc"] <= 1
    assert parity["int8_auroc_drop"] == pytest.approx(parity["fp32_auroc"] - parity["int8_auroc"])
    assert 0 <= parity["int8_decision_agreement"] <= 1


def test_the_three_engines_are_timed_at_each_batch_size(measured):
    rows = measured["rows"]
    assert [row["batch_size"] for row in rows] == [1, 8]
    for row in rows:
        assert min(row["torch_eager_img_s"], row["onnx_fp32_img_s"], row["onnx_int8_img_s"]) > 0
        assert row["int8_over_fp32"] == pytest.approx(
            row["onnx_int8_img_s"] / row["onnx_fp32_img_s"]
        )
        assert row["fp32_over_torch"] == pytest.approx(
            row["onnx_fp32_img_s"] / row["torch_eager_img_s"]
        )
    assert set(measured["sizes_bytes"]) == {"model.onnx", "model.int8.onnx"}
    assert "avx2" in measured["cpu_kernel_flags"], "the CPU flags ONNX Runtime's kernels follow"
    assert measured["onnxruntime"] and measured["tta"] == "none"
