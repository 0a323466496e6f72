#!/usr/bin/env python3
"""Compare a run's dvc.lock with the committed one, by the rule that fits how the run trained.

    scripts/repro-check.py [--against REV]     in the repository, after `dvc repro`

bit-identical: the run trained on the CPU at x86-64-v3 with portable numerics (what `make run`
  does on any x86-64 CPU with AVX2; src/pcam_pipeline/numerics.py), as the committed lock was
  made: every stage's entry must equal the committed one.
tolerance: the run trained on a GPU, or on a CPU below x86-64-v3 (or with `cpu.numerics:
  native`): its weights differ in the last bits, so its checkpoints and metrics do too. Every
  stage's inputs (code, params, data) must still equal the committed ones, and so must the
  outputs of the stages that do not depend on the weights (fetch, validate, preprocess,
  benchmark); the headline metrics of the others must lie within TOLERANCE of the committed.

The rule and the reason are printed; exit 0: reproduced under it, 1: what differs is listed.
docs/reproducibility.md says which runs are bit-identical to which.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

LOCK = "dvc.lock"
PROVENANCE = Path("models/best.provenance.json")
PORTABLE_LEVEL = "x86-64-v3"
# Absolute: a model trained with other kernels ranks the 512 test patches a little differently
# (docs/reproducibility.md has the measured spread); wider than that means something changed.
TOLERANCE = 0.03
HEADLINE = {
    "reports/metrics.json": (
        "test.auroc",
        "test.accuracy",
        "test.balanced_accuracy",
        "valid.auroc",
    ),
    "dvclive/train/metrics.json": ("val_auroc", "val_accuracy"),
}


def committed(path: str, rev: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def rule_for(record: dict[str, Any] | None) -> tuple[str, str]:
    """('bit-identical' | 'tolerance', why), from the run's provenance record."""
    if record is None:
        return "bit-identical", "train did not run (its inputs and outputs matched the lock)"
    device, cpu = record.get("device", "cpu"), record.get("cpu", {})
    if device != "cpu":
        # Which GPU: a MIG slice (1g.5gb) has fewer SMs than its whole A100, so only runs on
        # the same profile, driver and libraries are bit-identical to each other.
        gpu = record.get("gpu") or {}
        names = ", ".join(gpu.get("names") or []) or "GPU"
        profile = f", MIG profile {gpu['profile']}" if gpu.get("mig") else ""
        return "tolerance", (
            f"this run trained on {device} ({names}{profile}): GPU kernels are not the CPU's"
        )
    if cpu.get("level") != PORTABLE_LEVEL:
        why = (
            "cpu.numerics is native"
            if cpu.get("numerics") == "native"
            else f"this CPU ({cpu.get('cpu_model')}) lacks {PORTABLE_LEVEL} (AVX2 + FMA)"
        )
        return "tolerance", f"{why}: the libraries chose their own kernels"
    return "bit-identical", (
        f"this run trained on the CPU at {PORTABLE_LEVEL} with portable numerics "
        f"({cpu.get('cpu_model')}, {cpu.get('torch_threads')} threads)"
    )


def weight_dependent(stages: dict[str, Any]) -> set[str]:
    """The stages that write checkpoints, and those that read them (transitively)."""
    found = {name for name, s in stages.items() if any(o["path"].endswith(".pt") for o in outs(s))}
    grew = True
    while grew:
        produced = {o["path"] for name in found for o in outs(stages[name])}
        more = {
            name
            for name, stage in stages.items()
            if name not in found and produced & {d["path"] for d in stage.get("deps", [])}
        }
        found |= more
        grew = bool(more)
    return found


def outs(stage: dict[str, Any]) -> list[dict[str, Any]]:
    return [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]


def inputs(stage: dict[str, Any], produced_upstream: set[str]) -> dict[str, Any]:
    """A stage's params and deps, less the deps that are weight-dependent stages' outputs."""
    deps = [d for d in stage.get("deps", []) if d["path"] not in produced_upstream]
    return {"cmd": stage.get("cmd"), "params": stage.get("params"), "deps": deps}


def lookup(document: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        document = document[key]
    return document


def compare(
    ours: dict[str, Any],
    theirs: dict[str, Any],
    rule: str,
    metrics: dict[str, tuple[Any, Any]],
) -> tuple[list[str], list[str]]:
    """(problems, notes) of our lock's stages against the committed ones under `rule`;
    `metrics`: file -> (ours, committed) parsed metrics files."""
    problems, notes = [], []
    if sorted(ours) != sorted(theirs):
        return [f"the stages differ: {sorted(ours)} vs committed {sorted(theirs)}"], notes
    trained = weight_dependent(theirs) if rule == "tolerance" else set()
    produced = {o["path"] for name in trained for o in outs(theirs[name])}
    for name in ours:
        if name not in trained:
            if ours[name] != theirs[name]:
                problems.append(f"{name}: its dvc.lock entry differs from the committed one")
        elif inputs(ours[name], produced) != inputs(theirs[name], produced):
            problems.append(f"{name}: its inputs (code, params or data) differ from the committed")
    exact = sorted(name for name in set(ours) - trained if ours[name] == theirs[name])
    notes.append(f"identical: {', '.join(exact) or 'none'}")
    if trained:
        notes.append(f"inputs identical, outputs from other weights: {', '.join(sorted(trained))}")
        for path, (mine, reference) in metrics.items():
            for key in HEADLINE[path]:
                a, b = lookup(mine, key), lookup(reference, key)
                ok = abs(a - b) <= TOLERANCE
                line = f"{path} {key}: {a:.4f} (committed {b:.4f}, |diff| {abs(a - b):.4f})"
                (notes if ok else problems).append(line + (" ok" if ok else f" > {TOLERANCE}"))
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the revision to compare with")
    args = parser.parse_args(argv)
    ours = yaml.safe_load(Path(LOCK).read_text())["stages"]
    theirs = yaml.safe_load(committed(LOCK, args.against))["stages"]
    if ours == theirs:
        print(f"repro-check: dvc.lock equals {args.against}'s: reproduced bit for bit")
        return 0
    record = json.loads(PROVENANCE.read_text()) if PROVENANCE.exists() else None
    rule, why = rule_for(record)
    print(f"repro-check: rule: {rule}, because {why}")
    metrics = {
        path: (json.loads(Path(path).read_text()), json.loads(committed(path, args.against)))
        for path in HEADLINE
    }
    problems, notes = compare(ours, theirs, rule, metrics)
    for line in notes:
        print(f"repro-check: {line}")
    for line in problems:
        print(f"repro-check: DIFFERS: {line}", file=sys.stderr)
    if problems:
        hint = (
            " (`git diff dvc.lock` shows the entries; a CPU of another kind than the one that "
            "made the committed lock cannot explain a difference under this rule)"
            if rule == "bit-identical"
            else ""
        )
        print(f"repro-check: not reproduced under the {rule} rule{hint}", file=sys.stderr)
        return 1
    print(f"repro-check: reproduced under the {rule} rule")
    return 0


if __name__ == "__main__":
    sys.exit(main())
