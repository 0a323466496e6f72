"""reports/search/<study>/: the trials table, the champion, param importances and plots.

The champion is chosen by the validation objective only; test metrics are reported beside it.
Plots are Optuna's matplotlib ones (offline files, no browser).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from pcam_pipeline.experiments.records import is_test_metric
from pcam_pipeline.experiments.stats import Spread, spread
from pcam_pipeline.experiments.study import Study
from pcam_pipeline.repro import atomic_path, write_json

TRIALS_JSON = "trials.json"
TRIALS_MARKDOWN = "trials.md"


ORIGIN_ATTR = "origin"  # set when a trial is asked; a retry copies its user attrs


def origin_number(trial: Any) -> int:
    """The number of the trial a retry repeats (its experiments' names), else its own."""
    return int(trial.user_attrs.get(ORIGIN_ATTR, trial.number))


def trial_spreads(trial: Any) -> dict[str, Spread]:
    """Each metric's spread over the trial's seeds (from the per-seed metrics it recorded)."""
    per_seed: dict[str, dict[str, float]] = trial.user_attrs.get("metrics") or {}
    names = sorted({m for metrics in per_seed.values() for m in metrics})
    return {m: spread([metrics[m] for metrics in per_seed.values() if m in metrics]) for m in names}


def trials_record(spec: Study, trials: list[Any], best: Any | None) -> dict[str, Any]:
    return {
        "study": spec.name,
        "objective": spec.objective.model_dump(),
        "seeds": spec.seeds,
        "best_trial": None if best is None else origin_number(best),
        "trials": [
            {
                "number": origin_number(t),
                "params": t.params,
                "objective": t.value,
                "experiments": t.user_attrs.get("experiments", []),
                "metrics": {m: s.as_dict() for m, s in trial_spreads(t).items()},
            }
            for t in trials
        ],
    }


def trials_markdown(spec: Study, trials: list[Any], best: Any | None) -> str:
    metric = spec.objective.metric
    keys = list(spec.params)
    shown = [metric, *sorted({m for t in trials for m in trial_spreads(t) if is_test_metric(m)})]
    shown = [m for m in shown if m in {metric, "test.auroc", "test.accuracy"}]
    header = ["trial", *keys, *[f"{m} (mean ± std)" for m in shown], "experiments"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        spreads = trial_spreads(t)
        mark = " (best)" if best is not None and t.number == best.number else ""
        cells = [f"{origin_number(t)}{mark}", *[_short(t.params.get(k)) for k in keys]]
        cells += [spreads[m].text() if m in spreads else "-" for m in shown]
        cells.append(", ".join(t.user_attrs.get("experiments", [])))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if best is not None:
        first = best.user_attrs.get("experiments", ["?"])[0]
        text += (
            f"\nBest by {metric} ({spec.objective.direction}): trial {origin_number(best)}, "
            f"{metric} = {best.value:.4f} over seeds {spec.seeds}. `pcam search apply-best "
            f"STUDY_FILE` writes its params.yaml (experiment {first}); commit it.\n"
        )
    return text


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def importances(study: Any) -> dict[str, float]:
    """Optuna's fANOVA-free estimate (PED-ANOVA needs no scikit-learn); {} below 2 trials or
    a single searched param."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError) as exc:
        logging.getLogger(__name__).info("no importances: %s", exc)
        return {}


def write_plots(study: Any, directory: Path, have_importances: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    makers = {
        "history": plots.plot_optimization_history,
        "parallel_coordinate": plots.plot_parallel_coordinate,
    }
    if have_importances:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        makers["importance"] = lambda s: plots.plot_param_importances(s, evaluator=evaluator)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notices
        for name, make in makers.items():
            axes = make(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            with atomic_path(directory / f"{name}.png") as tmp:
                figure.savefig(tmp, format="png", dpi=100)
            plt.close(figure)
            written.append(f"{name}.png")
    return written


def main(spec: Study, study: Any, directory: Path) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if trials else None
    record = trials_record(spec, trials, best)
    record["importances"] = importances(study) if len(trials) > 1 else {}
    record["plots"] = write_plots(study, directory, bool(record["importances"])) if trials else []
    write_json(directory / TRIALS_JSON, record)
    markdown = trials_markdown(spec, trials, best)
    if record["importances"]:
        markdown += (
            "\nParameter importances (PED-ANOVA): "
            + ", ".join(f"{k} {v:.2f}" for k, v in record["importances"].items())
            + "\n"
        )
    with atomic_path(directory / TRIALS_MARKDOWN) as tmp:
        tmp.write_text(markdown)
    print(markdown, end="")
    print(f"wrote {directory}/ ({TRIALS_JSON}, {TRIALS_MARKDOWN}, {', '.join(record['plots'])})")
    return record


def best_experiment(directory: Path) -> str:
    """The champion's first experiment, from the written trials record."""
    record = json.loads((directory / TRIALS_JSON).read_text())
    best = next(t for t in record["trials"] if t["number"] == record["best_trial"])
    return str(best["experiments"][0])
