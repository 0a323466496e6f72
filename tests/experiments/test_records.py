from pcam_pipeline.experiments.records import flatten, is_validation_metric, parse_exp_show
from tests.exp_show import exp_show, experiment


def test_experiments_are_read_with_flat_params_and_numeric_metrics():
    records = parse_exp_show(exp_show(experiment("a", 0.001, 1, 0.8, 0.7)))
    assert [r.name for r in records] == ["a"]  # not the workspace, not the baseline commit
    record = records[0]
    assert record.params == {"train.lr": 0.001, "train.seed": 1}
    assert record.seed == 1
    assert record.metrics["valid.auroc"] == 0.8
    assert record.metrics["test.confusion.tp"] == 3.0
    assert record.metrics["val_loss"] == 0.5
    assert "threshold.chosen_on" not in record.metrics  # text is no metric


def test_a_failed_experiment_and_a_repeated_one_are_left_out():
    failed = experiment("broken", 0.001, 1, 0.8, 0.7)
    failed["revs"][0]["error"] = {"msg": "stage failed"}
    same = experiment("a", 0.001, 1, 0.8, 0.7)
    rows = exp_show(same, failed)
    rows.append({"rev": "def5678", "experiments": [same]})  # `-A`: seen under two rows
    assert [r.name for r in parse_exp_show(rows)] == ["a"]


def test_flatten_and_metric_splits():
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": [1, 2]}
    assert is_validation_metric("valid.auroc") and is_validation_metric("val_loss")
    assert not is_validation_metric("test.auroc")
