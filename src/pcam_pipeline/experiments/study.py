"""The search's study file (study.yaml), typed: what a `pcam search` explores and how it chooses.

    name: lr-wd                      # experiments are named <name>-t<trial>-s<seed>
    n_trials: 6
    seeds_per_trial: 2               # train.seed = first_seed, first_seed + 1, ...
    first_seed: 1
    objective: {metric: valid.auroc, direction: maximize}   # a validation metric only
    sampler: {seed: 0}               # TPE, seeded: the same file proposes the same params
    params:                          # any params.yaml key, by dotted path
      train.lr: {distribution: log-uniform, low: 1.0e-4, high: 1.0e-2}
      train.weight_decay: {distribution: uniform, low: 0.0, high: 1.0e-3}
      train.epochs: {distribution: int, low: 1, high: 4}
      train.optimizer: {distribution: choice, choices: [adamw, sgd]}

Every bound and choice is checked against params.py before any experiment runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments.records import (
    SEED_PARAM,
    flatten,
    is_test_metric,
    is_validation_metric,
)
from pcam_pipeline.params import ParamsError, parse_params


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogUniform(_Strict):
    distribution: Literal["log-uniform"]
    low: Annotated[float, Field(gt=0)]
    high: Annotated[float, Field(gt=0)]

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class Uniform(_Strict):
    distribution: Literal["uniform"]
    low: float
    high: float

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class IntRange(_Strict):
    distribution: Literal["int"]
    low: int
    high: int
    step: Annotated[int, Field(ge=1)] = 1

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class Choice(_Strict):
    distribution: Literal["choice"]
    choices: Annotated[list[Any], Field(min_length=1)]

    def values_to_check(self) -> list[Any]:
        return list(self.choices)


Distribution = Annotated[
    LogUniform | Uniform | IntRange | Choice, Field(discriminator="distribution")
]


class Objective(_Strict):
    metric: str = "valid.auroc"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _validation_metric_only(cls, metric: str) -> str:
        if is_test_metric(metric) or not is_validation_metric(metric):
            raise ValueError(
                f"'{metric}' is not a validation metric: the champion is chosen on the "
                "validation split (metrics named valid.* or val_*, e.g. valid.auroc, val_loss); "
                "test metrics are reported, never optimised"
            )
        return metric


class Sampler(_Strict):
    seed: int = 0


class Study(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    n_trials: Annotated[int, Field(ge=1)]
    seeds_per_trial: Annotated[int, Field(ge=1)] = 1
    first_seed: int = 1
    objective: Objective = Objective()
    sampler: Sampler = Sampler()
    params: Annotated[dict[str, Distribution], Field(min_length=1)]

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds_per_trial))

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Study:
        for key, dist in self.params.items():
            if not isinstance(dist, Choice) and dist.low >= dist.high:
                raise ValueError(f"params.{key}: low must be below high")
        return self


def experiment_name(study: str, trial: int, seed: int) -> str:
    return f"{study}-t{trial}-s{seed}"


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(p) for p in error["loc"])
    # the union's branch name (e.g. "params.train.lr.choice.choices") is noise for the reader
    location = re.sub(r"\.(log-uniform|uniform|int|choice)(?=\.|$)", "", location)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_invalid":
        return f"{location}: distribution must be one of log-uniform, uniform, int, choice"
    if error["type"] == "union_tag_not_found":
        return f"{location}: missing 'distribution' (log-uniform, uniform, int or choice)"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key; see the keys in src/pcam_pipeline/experiments/study.py"
    return f"{location}: {message}" + (
        f" (found {error['input']!r})" if not isinstance(error.get("input"), dict) else ""
    )


def check_against_params(study: Study, raw_params: dict[str, Any], source: str) -> None:
    """Each searched key must be a params.yaml key (not the seed), and each bound or choice a
    value params.py accepts there: a typo fails now, not in trial 5."""
    known = flatten(raw_params)
    for key, dist in study.params.items():
        if key == SEED_PARAM:
            raise PipelineError(
                f"{source}: params.{key}: the seed is not searched; each trial runs "
                f"seeds_per_trial seeds (first_seed, first_seed + 1, ...)"
            )
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PipelineError(
                f"{source}: params.{key}: no such key in params.yaml{hint}; name it by its "
                "dotted path, e.g. train.lr"
            )
        for value in dist.values_to_check():
            try:
                parse_params(
                    with_value(raw_params, key, value), f"params.yaml with {key}={value!r}"
                )
            except ParamsError as exc:
                raise PipelineError(
                    f"{source}: params.{key}: {value!r} is refused: {exc}"
                ) from None


def with_value(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the nested params with one dotted key set."""
    head, _, rest = dotted.partition(".")
    copy = dict(raw)
    copy[head] = with_value(raw[head], rest, value) if rest else value
    return copy


def load_study(path: Path, raw_params: dict[str, Any]) -> Study:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: study file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from None
    try:
        study = Study.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  {_describe(e)}" for e in exc.errors())
        raise PipelineError(f"{path} is not a valid study file:\n{lines}") from None
    check_against_params(study, raw_params, str(path))
    return study


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (as `dvc exp run -S` takes them) into {key: value}, values as YAML."""
    fixed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"-S {item!r}: expected KEY=VALUE, e.g. -S train.device=cuda")
        fixed[key] = yaml.safe_load(value)
    return fixed
