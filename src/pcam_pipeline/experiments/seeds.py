"""`pcam seeds N`: the current params under N seeds, one DVC experiment each."""

from __future__ import annotations

from pathlib import Path

from pcam_pipeline.experiments import dvc
from pcam_pipeline.experiments.records import SEED_PARAM


def seed_list(first: int, count: int) -> list[int]:
    if count < 1:
        raise ValueError(f"seeds: N must be at least 1 (found {count})")
    return list(range(first, first + count))


def experiment_name(prefix: str, seed: int) -> str:
    return f"{prefix}-s{seed}"


def main(count: int, first: int, prefix: str = "seeds", repo: Path = Path(".")) -> list[str]:
    """Run `dvc exp run -S train.seed=S` for seeds first .. first+count-1, skipping those whose
    experiment exists already (a rerun continues); the names of all of them."""
    existing = dvc.experiment_names(repo)
    names = []
    for seed in seed_list(first, count):
        name = experiment_name(prefix, seed)
        names.append(name)
        if name in existing:
            print(f"{name}: exists already, kept")
            continue
        print(f"{name}: dvc exp run -S {SEED_PARAM}={seed}", flush=True)
        dvc.exp_run(repo, name, {SEED_PARAM: seed})
    print(f"done: {', '.join(names)}; `pcam summarize` gives their mean and spread")
    return names
