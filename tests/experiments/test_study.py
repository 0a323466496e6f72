from pathlib import Path

import pytest
import yaml

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments.study import experiment_name, load_study, parse_assignments
from tests.conftest import raw_params_with

GOOD = {
    "name": "lr-wd",
    "n_trials": 4,
    "seeds_per_trial": 2,
    "params": {
        "train.lr": {"distribution": "log-uniform", "low": 1e-4, "high": 1e-2},
        "train.epochs": {"distribution": "int", "low": 1, "high": 3},
        "train.optimizer": {"distribution": "choice", "choices": ["adamw", "sgd"]},
    },
}


def study_from(tmp_path: Path, **changes):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **changes}))
    return load_study(path, raw_params_with())


def refusal(tmp_path: Path, **changes) -> str:
    with pytest.raises(PipelineError) as caught:
        study_from(tmp_path, **changes)
    return str(caught.value)


def test_a_good_study_has_its_defaults(tmp_path):
    study = study_from(tmp_path)
    assert study.seeds == [1, 2]
    assert (study.objective.metric, study.objective.direction) == ("valid.auroc", "maximize")
    assert experiment_name(study.name, 3, 2) == "lr-wd-t3-s2"


def test_a_test_metric_is_refused_as_objective(tmp_path):
    message = refusal(tmp_path, objective={"metric": "test.auroc"})
    assert "objective.metric" in message and "validation" in message


def test_an_unknown_distribution_names_the_allowed_ones(tmp_path):
    message = refusal(tmp_path, params={"train.lr": {"distribution": "normal", "low": 0}})
    assert "params.train.lr" in message
    assert "log-uniform, uniform, int, choice" in message


def test_a_key_not_in_params_yaml_is_named_with_a_hint(tmp_path):
    message = refusal(tmp_path, params={"lr": {"distribution": "uniform", "low": 0, "high": 1}})
    assert "params.lr: no such key" in message and "train.lr" in message


def test_a_choice_params_py_refuses_is_caught_before_any_trial(tmp_path):
    choice = {"distribution": "choice", "choices": ["adamw", "lion"]}
    message = refusal(tmp_path, params={"train.optimizer": choice})
    assert "'lion' is refused" in message and "train.optimizer" in message


def test_the_seed_is_not_searched_and_bounds_are_ordered(tmp_path):
    seed = {"distribution": "int", "low": 1, "high": 9}
    assert "seed is not searched" in refusal(tmp_path, params={"train.seed": seed})
    backwards = {"distribution": "uniform", "low": 0.5, "high": 0.1}
    assert "low must be below high" in refusal(tmp_path, params={"train.gamma": backwards})


def test_fixed_params_are_read_as_yaml_values():
    assert parse_assignments(["train.device=cuda", "train.cnn.channels=[8, 16]"]) == {
        "train.device": "cuda",
        "train.cnn.channels": [8, 16],
    }
    with pytest.raises(PipelineError, match="expected KEY=VALUE"):
        parse_assignments(["train.device"])
