"""The search's own logic on real Optuna studies in memory: proposals, retries, the report."""

import time

import optuna
import pytest
from optuna.trial import TrialState

from pcam_pipeline.experiments.search import fail_stale_trials, propose
from pcam_pipeline.experiments.search_report import origin_number, trials_markdown
from pcam_pipeline.experiments.study import Study
from tests.search_proposals import proposals

SPEC = Study.model_validate(
    {
        "name": "unit",
        "n_trials": 4,
        "seeds_per_trial": 2,
        "sampler": {"seed": 7},
        "params": {
            "train.lr": {"distribution": "log-uniform", "low": 1e-4, "high": 1e-2},
            "train.epochs": {"distribution": "int", "low": 1, "high": 3},
            "train.cnn.channels": {"distribution": "choice", "choices": [[8, 16], [16, 32]]},
        },
    }
)


def test_the_same_sampler_seed_proposes_the_same_params():
    first = proposals(SPEC)
    assert first == proposals(SPEC, finish_in_reverse=True)
    assert len({v["train.lr"] for v in first}) == SPEC.n_trials
    assert all(v["train.cnn.channels"] in ([8, 16], [16, 32]) for v in first)  # lists survive
    other = SPEC.model_copy(update={"sampler": SPEC.sampler.model_copy(update={"seed": 8})})
    assert proposals(other) != first


def test_a_trial_whose_worker_stopped_beating_is_failed_and_retried_once():
    study = optuna.create_study(direction="maximize")
    dead, values = propose(SPEC, study)
    alive, _ = propose(SPEC, study)
    alive.set_user_attr("heartbeat", time.time() + 1000)
    later = time.time() + 500
    assert fail_stale_trials(study, stale_after=60, now=later) == [dead.number]
    assert fail_stale_trials(study, stale_after=60, now=later) == []  # failed once, not twice
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retry, retried_values = propose(SPEC, study)
    assert retried_values == values and origin_number(retry) == dead.number


def test_the_table_marks_the_best_by_the_validation_objective():
    study = optuna.create_study(direction="maximize")
    for value in (0.7, 0.9, 0.8):
        trial, _ = propose(SPEC, study)
        trial.set_user_attr("experiments", [f"unit-t{trial.number}-s1"])
        trial.set_user_attr("metrics", {"a": {"valid.auroc": value, "test.auroc": 1 - value}})
        study.tell(trial, value)
    text = trials_markdown(SPEC, study.trials, study.best_trial)
    assert "| 1 (best) |" in text and "(experiment unit-t1-s1)" in text
    assert pytest.approx(study.best_value) == 0.9
