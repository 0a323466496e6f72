"""Hand-made `dvc exp show --json` output, shaped as DVC 3 writes it (one baseline row holding
its experiments, each with one revision whose data holds params and metrics by file)."""

from __future__ import annotations

from typing import Any


def experiment(
    name: str, lr: float, seed: int, valid_auroc: float, test_auroc: float
) -> dict[str, Any]:
    return {
        "name": name,
        "executor": None,
        "revs": [
            {
                "rev": f"rev-{name}",
                "name": name,
                "error": None,
                "data": {
                    "params": {"params.yaml": {"data": {"train": {"lr": lr, "seed": seed}}}},
                    "metrics": {
                        "reports/metrics.json": {
                            "data": {
                                "valid": {"auroc": valid_auroc, "n": 64},
                                "test": {"auroc": test_auroc, "confusion": {"tp": 3}},
                                "threshold": {"chosen_on": "valid"},
                            }
                        },
                        "dvclive/train/metrics.json": {"data": {"val_loss": 0.5, "lr": lr}},
                    },
                },
            }
        ],
    }


def exp_show(*experiments: dict[str, Any]) -> list[dict[str, Any]]:
    baseline_data = experiment("baseline", 0.002, 42, 0.9, 0.9)["revs"][0]["data"]
    return [
        {"rev": "workspace", "name": None, "data": baseline_data, "experiments": None},
        {"rev": "abc1234", "name": "main", "data": baseline_data, "experiments": list(experiments)},
    ]
