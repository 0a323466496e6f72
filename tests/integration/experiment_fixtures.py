"""The small baseline the DVC experiment tests commit (test_experiments.py) and the search tests
build on (test_search.py): the params overrides, the update that applies them, git's identity."""

from __future__ import annotations

from typing import Any

SMALL = {
    "fetch": {"sizes": {"train": 256, "valid": 128, "test": 128}},
    "train": {"epochs": 1},
    # 128 test patches: one pair ranked the other way moves the AUROC by 1/4096
    "export": {"int8": {"max_auroc_drop": 0.05}},
    "export_bench": {"batch_sizes": [8], "rounds": 1},
    "benchmark": {
        "batch_sizes": [8],
        "devices": ["cpu"],
        "precisions": ["fp32"],
        "warmup_iters": 0,
        "timed_iters": 1,
        "latency_iters": 2,
        "loader_patches": 64,
        "baseline_patches": 16,
    },
}
GIT = ["git", "-c", "user.name=pcam-tests", "-c", "user.email=tests@pcam.invalid"]


def update(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            update(raw[key], value)
        else:
            raw[key] = value
