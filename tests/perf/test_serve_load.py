"""The serving load test (`python -m pcam_pipeline.perf.serve_load`), shortened: locust drives
`pcam serve` headless, in-process ONNX Runtime is timed at the same batch sizes, and the report
holds both side by side with latency percentiles and errors. About 30 s: in the fast set, so
`make coverage` measures the load test's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcam_pipeline.perf import serve_load


def test_the_load_test_reports_served_and_in_process_side_by_side(
    exported_run: Path, tmp_path, capsys
):
    out = tmp_path / "serve-load.json"
    export_dir = exported_run / "models" / "export"
    argv = ["--seconds", "3", "--users", "4", "--export-dir", str(export_dir), "--out", str(out)]
    assert serve_load.main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["users"], r["patches_per_request"]) for r in rows] == [(4, 1), (8, 256)]
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == 0
        assert row["img_per_s"] == pytest.approx(row["requests_per_s"] * row["patches_per_request"])
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_batch_patches"] >= row["patches_per_request"]
        assert row["in_process_batch"] == min(row["users"] * row["patches_per_request"], 256)
        assert row["in_process_img_per_s"] > 0
        assert row["served_over_in_process"] == pytest.approx(
            row["img_per_s"] / row["in_process_img_per_s"]
        )
    assert report["environment"] and "serve_load" in report["command"]
    printed = capsys.readouterr().out
    assert "| 4 x 1 |" in printed and "| 8 x 256 |" in printed
