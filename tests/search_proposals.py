"""The search's proposals for a study, asked of an in-memory Optuna study: what a sampler seed
proposes, shared by the unit tests (tests/experiments/test_search.py) and the integration test
that checks a real search ran them (tests/integration/test_search.py)."""

from __future__ import annotations

import optuna

from pcam_pipeline.experiments.search import propose
from pcam_pipeline.experiments.study import Study


def proposals(spec: Study, finish_in_reverse: bool = False) -> list[dict]:
    study = optuna.create_study(direction="maximize")
    asked = [propose(spec, study) for _ in range(spec.n_trials)]
    for trial, _ in reversed(asked) if finish_in_reverse else asked:
        study.tell(trial, 0.5)
    return [values for _, values in asked]
