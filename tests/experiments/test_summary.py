import statistics

import pytest

from pcam_pipeline.experiments.records import parse_exp_show
from pcam_pipeline.experiments.summary import (
    render_markdown,
    summarize,
    summary_json,
    table_rows,
)
from tests.exp_show import exp_show, experiment


@pytest.fixture
def groups():
    rows = exp_show(
        experiment("lo-s1", 0.001, 1, 0.80, 0.70),
        experiment("hi-s1", 0.01, 1, 0.60, 0.50),
        experiment("lo-s2", 0.001, 2, 0.84, 0.74),
        experiment("lo-s3", 0.001, 3, 0.79, 0.72),
        experiment("hi-s2", 0.01, 2, 0.62, 0.55),
    )
    return summarize(parse_exp_show(rows))


def test_experiments_are_grouped_by_params_minus_the_seed(groups):
    assert [[r.name for r in g.experiments] for g in groups] == [
        ["lo-s1", "lo-s2", "lo-s3"],
        ["hi-s1", "hi-s2"],
    ]
    assert groups[0].seeds == [1, 2, 3]
    assert "train.seed" not in groups[0].params


def test_each_group_has_the_spread_of_its_validation_and_test_metrics(groups):
    low = groups[0].metrics
    assert low["valid.auroc"].mean == pytest.approx(statistics.mean([0.80, 0.84, 0.79]))
    assert low["test.auroc"].std == pytest.approx(statistics.stdev([0.70, 0.74, 0.72]))
    assert "val_loss" in low and "lr" not in low  # lr is neither a validation nor a test metric


def test_json_and_table_name_what_tells_the_groups_apart(groups):
    data = summary_json(groups)
    assert data["varying_params"] == ["train.lr"]
    assert data["groups"][1]["params"] == {"train.lr": 0.01}
    assert data["groups"][1]["metrics"]["valid.auroc"]["n"] == 2
    rows = table_rows(groups, ["valid.auroc"])
    assert rows[0] == ["train.lr", "runs", "valid.auroc"]
    assert rows[1] == ["0.001", "3", "0.8100 ± 0.0265"]
    assert render_markdown(rows).splitlines()[1] == "|---|---|---|"
