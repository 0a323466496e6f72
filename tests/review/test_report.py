"""The pure parts of `pcam report` (src/pcam_pipeline/review/report.py); the whole command runs
against real dvc in tests/integration/test_report.py."""

from __future__ import annotations

from pcam_pipeline.review.report import baseline_rows, has_rows, slug


def test_plot_titles_and_paths_become_file_names():
    assert slug("AUROC and accuracy") == "auroc-and-accuracy"
    assert slug("reports/evaluate/confident_errors.png") == "reports-evaluate-confident-errors-png"
    assert slug("???") == "plot"


def test_an_empty_dvc_table_has_no_rows():
    assert not has_rows("| Path | Param | HEAD~1 | workspace |\n|---|---|---|---|")
    assert has_rows("| a | b |\n|---|---|\n| 1 | 2 |")


def test_the_baseline_sits_beside_the_metrics_it_has():
    diff = {
        "reports/metrics.json": {
            "baseline.auroc": {"old": 0.5, "new": 0.5},
            "test.auroc": {"old": 0.9, "new": 0.95},
            "baseline.class": {"old": 1, "new": 1},  # no test.class: not a comparable metric
            "test.f1": {"old": 0.8, "new": 0.85},  # no baseline: only in the metrics diff
        }
    }
    assert baseline_rows(diff) == [["auroc", "0.9", "0.95", "0.5"]]
    assert baseline_rows({}) == []
