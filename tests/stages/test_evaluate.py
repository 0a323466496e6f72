"""evaluate: metrics against scikit-learn and by hand, threshold from validation, the stage."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.evaluation import metrics
from pcam_pipeline.evaluation import report as evaluation_report
from pcam_pipeline.evaluation.confident_errors import confident_errors
from pcam_pipeline.evaluation.slices import slice_metrics
from pcam_pipeline.inference import model_from_checkpoint, predict_split
from pcam_pipeline.stages import evaluate
from tests.tiny_pipeline import small_run_params, workdir

# A tiny example worked out by hand (threshold 0.5).
LABELS = np.array([0, 0, 1, 1, 1, 0])
PROBS = np.array([0.05, 0.15, 0.12, 0.85, 0.95, 0.55])


def test_report_on_a_hand_worked_example():
    report = metrics.classification_report(LABELS, PROBS, 0.5, calibration_bins=10)
    # predictions 0 0 0 1 1 1: tp = 2 (0.85, 0.95), fn = 1 (0.12), fp = 1 (0.55), tn = 2
    assert report["confusion"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert report["n"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert report["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUROC: of the 9 (positive, negative) pairs, 7 rank the positive higher
    assert report["auroc"] == pytest.approx(7 / 9)
    # average precision: positives at ranks 1, 2 and 5 -> (1 + 1 + 3/5) / 3
    assert report["pr_auc"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    nll = -np.mean(np.log([0.95, 0.85, 0.12, 0.85, 0.95, 0.45]))
    assert report["nll"] == pytest.approx(nll)
    # ECE, 10 bins: [0,.1) {0.05: y=0}; [.1,.2) {0.15: 0, 0.12: 1}; [.5,.6) {0.55: 0};
    # [.8,.9) {0.85: 1}; [.9,1] {0.95: 1}
    ece = (1 * 0.05 + 2 * abs(0.5 - 0.135) + 1 * 0.55 + 1 * 0.15 + 1 * 0.05) / 6
    assert ece == pytest.approx(0.255)
    assert report["ece"] == pytest.approx(ece)


def test_report_matches_scikit_learn_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = 1 / (1 + np.exp(-(rng.normal(size=500) + 1.5 * (labels - 0.5))))
    threshold = 0.4
    report = metrics.classification_report(labels, probs, threshold, calibration_bins=10)
    predicted = (probs >= threshold).astype(int)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert report["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(labels, predicted)
    )
    assert report["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert report["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert report["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert report["nll"] == pytest.approx(skm.log_loss(labels, probs))
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted).ravel()
    assert report["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    # ECE = the calibration curve's points weighted by how many patches each bin holds
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    counts = np.histogram(probs, bins=np.linspace(0, 1, 11))[0]
    weights = counts[counts > 0] / len(probs)
    assert report["ece"] == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))


def test_perfect_and_constant_scores():
    labels = np.array([0, 1, 0, 1])
    perfect = metrics.classification_report(labels, np.array([0.0, 1.0, 0.0, 1.0]), 0.5)
    assert perfect["accuracy"] == perfect["auroc"] == perfect["f1"] == 1.0
    assert perfect["ece"] == 0.0 and perfect["nll"] < 1e-6  # probabilities clipped, never log(0)
    assert math.isnan(metrics.auroc(np.array([1, 1]), np.array([0.2, 0.9]))), "one class: NaN"


def test_majority_baseline():
    baseline = metrics.majority_baseline(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0, 1]))
    assert baseline == {"class": 1, "accuracy": 0.4, "balanced_accuracy": 0.5, "auroc": 0.5}


# Validation separates perfectly at 0.6; the test split would separate perfectly at 0.35.
VALID_LABELS = np.array([0, 0, 0, 1, 1, 1])
VALID_PROBS = np.array([0.10, 0.20, 0.30, 0.60, 0.70, 0.80])
TEST_LABELS = np.array([0, 0, 0, 1, 1, 1])
TEST_PROBS = np.array([0.10, 0.20, 0.30, 0.35, 0.50, 0.80])


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_threshold_is_chosen_on_validation_not_test(rule):
    on_valid = metrics.choose_threshold(VALID_LABELS, VALID_PROBS, rule)
    on_test = metrics.choose_threshold(TEST_LABELS, TEST_PROBS, rule)
    assert on_valid == pytest.approx(0.6)
    assert on_test == pytest.approx(0.35), "tuning on test would pick another threshold"
    params = small_run_params(evaluate={"threshold_rule": rule}).evaluate
    result = evaluation_report.metrics_report(
        VALID_LABELS, VALID_PROBS, TEST_LABELS, TEST_PROBS, np.array([0, 1, 1]), params
    )
    assert result["threshold"] == {"rule": rule, "value": on_valid, "chosen_on": "valid"}
    # at 0.6 only 0.80 is called positive on test: the honest, worse, number is reported
    assert result["test"]["confusion"] == {"tn": 3, "fp": 0, "fn": 2, "tp": 1}
    assert result["test"]["accuracy"] == pytest.approx(4 / 6)
    tuned_on_test = metrics.classification_report(TEST_LABELS, TEST_PROBS, on_test)
    assert tuned_on_test["accuracy"] == 1.0
    assert result["gain_over_baseline"]["accuracy"] == pytest.approx(4 / 6 - 0.5)


def test_fixed_threshold_rule():
    params = small_run_params(evaluate={"threshold_rule": "fixed", "fixed_threshold": 0.25})
    result = evaluation_report.metrics_report(
        VALID_LABELS, VALID_PROBS, TEST_LABELS, TEST_PROBS, np.array([0, 1]), params.evaluate
    )
    assert result["threshold"]["value"] == 0.25


def test_confident_errors_and_slices():
    labels = np.array([0, 1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.6, 0.8, 0.1])
    assert confident_errors(labels, probs, 0.5, 2).tolist() == [0, 1]
    features = {"brightness": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    slices = slice_metrics(labels, probs, 0.5, features, n_slices=2)
    assert [row["n"] for row in slices["slices"]] == [2, 3]
    assert slices["worst"]["accuracy"] == 0.0 and slices["worst"]["bin"] == 0


def test_evaluate_stage_uses_the_validation_split_for_the_threshold(
    trained_run, tiny_data, tmp_path, monkeypatch
):
    shutil.copytree(trained_run / "models", tmp_path / "models")
    seen = []

    def spy(labels, probs, rule, fixed=0.5):
        seen.append(labels.copy())
        return metrics.choose_threshold(labels, probs, rule, fixed)

    monkeypatch.setattr(evaluation_report, "choose_threshold", spy)
    params = small_run_params()
    with workdir(tmp_path, tiny_data):
        evaluate.main(params)

    valid = Split.open(tiny_data / "valid.h5", params.loader)
    test = Split.open(tiny_data / "test.h5", params.loader)
    assert len(seen) == 1 and np.array_equal(seen[0], valid.labels)

    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    model, mean, std, checkpoint = model_from_checkpoint(
        tmp_path / "models" / "best.pt", torch.device("cpu")
    )
    probs = {
        name: predict_split(
            model, DeviceBatches(split, torch.device("cpu"), params.loader), mean, std, 256
        )
        for name, split in (("valid", valid), ("test", test))
    }
    threshold = metrics.choose_threshold(valid.labels, probs["valid"], "youden")
    assert report["threshold"] == {"rule": "youden", "value": threshold, "chosen_on": "valid"}
    expected = metrics.classification_report(test.labels.astype(int), probs["test"], threshold, 10)
    assert report["test"] == json.loads(json.dumps(expected))
    assert report["test"]["auroc"] == pytest.approx(skm.roc_auc_score(test.labels, probs["test"]))
    assert report["baseline"]["accuracy"] == pytest.approx(
        max(test.labels.mean(), 1 - test.labels.mean())
    )
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        assert report["gain_over_baseline"][key] == pytest.approx(
            report["test"][key] - report["baseline"][key]
        )
    assert report["best_epoch"] == checkpoint["progress"]["best_epoch"]
    assert report["worst_slice"]["feature"] in ("brightness", "stain_intensity")
    assert all(math.isfinite(report["test"][k]) for k in ("accuracy", "nll", "ece", "pr_auc"))

    out = tmp_path / "reports" / "evaluate"
    for name in ("roc", "pr", "confusion", "calibration"):
        assert json.loads((out / "plots" / "sklearn" / f"{name}.json").read_text())
    assert (out / "confident_errors.png").read_bytes()[:4] == b"\x89PNG"
    slices = json.loads((out / "slices.json").read_text())
    assert sum(row["n"] for row in slices["slices"]) == 2 * len(test.labels)  # two features


def test_evaluate_with_tta_chooses_the_threshold_on_valid_under_it(
    trained_run, tiny_data, tmp_path
):
    shutil.copytree(trained_run / "models", tmp_path / "models")
    params = small_run_params(evaluate={"tta": "d8"})
    with workdir(tmp_path, tiny_data):
        evaluate.main(params)
    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert report["tta"] == "d8"
    cpu = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(tmp_path / "models" / "best.pt", cpu)
    splits = {
        name: Split.open(tiny_data / f"{name}.h5", params.loader) for name in ("valid", "test")
    }
    probs = {
        name: predict_split(
            model, DeviceBatches(split, cpu, params.loader), mean, std, 256, tta="d8"
        )
        for name, split in splits.items()
    }
    threshold = metrics.choose_threshold(splits["valid"].labels, probs["valid"], "youden")
    assert report["threshold"]["value"] == threshold
    auroc = skm.roc_auc_score(splits["test"].labels, probs["test"])
    assert report["test"]["auroc"] == pytest.approx(auroc)
