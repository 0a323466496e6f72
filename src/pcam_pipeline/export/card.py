"""The model card: what the exported model is, what it was made from, how well it does, and
what it is for. `model_card.json` for programs (the server, the bundle's runner), the same
facts as `model_card.md` for people. Only facts fixed by the inputs enter it (no time, host or
commit), so the card is as reproducible as the model."""

from __future__ import annotations

from typing import Any

INTENDED_USE = (
    "Research and teaching: ranking 96x96 patches of H&E-stained lymph node sections at 10x "
    "(about 1 micrometre per pixel) by the probability that their centre holds metastatic "
    "tumour tissue, and mapping that probability over whole slides."
)
LIMITS = [
    "Not a medical device: never use it for diagnosis or treatment decisions.",
    "Patches other than H&E lymph node sections at about 1 um/px (other organs, stains, "
    "magnifications) are outside what it was trained and tested on.",
    "Scanners and staining protocols other than the training data's shift the colours it "
    "relies on: check new data for drift before trusting its scores.",
    "The threshold was chosen on the validation split; another prevalence or cost of errors "
    "calls for another threshold.",
]
DATA_LIMITS = {
    "synthetic": "Trained and tested on the pipeline's synthetic stand-in for PCAM (the "
    "embedded default): it shows that the pipeline works, and says nothing about real tissue.",
    "zenodo": "Trained on PatchCamelyon (Camelyon16 slides of two Dutch centres, Radboud UMC "
    "and UMC Utrecht); its test split is from the same centres.",
    "path": "Trained on a copy of PatchCamelyon (Camelyon16 slides of two Dutch centres, "
    "Radboud UMC and UMC Utrecht); its test split is from the same centres.",
}


def model_card(
    *,
    identity: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    interface: dict[str, Any],
    files: dict[str, dict[str, Any]],
    export: dict[str, Any],
    trained_with: dict[str, Any],
) -> dict[str, Any]:
    """The card as plain data (model_card.json)."""
    return {
        "model": identity,
        "intended_use": INTENDED_USE,
        "limits": [DATA_LIMITS[data["source"]], *LIMITS],
        "data": data,
        "metrics": {
            "test": {k: metrics["test"][k] for k in ("auroc", "accuracy", "balanced_accuracy")},
            "valid_auroc": metrics["valid"]["auroc"],
            "threshold": metrics["threshold"],
            "tta": metrics["tta"],
            "baseline_accuracy": metrics["baseline"]["accuracy"],
        },
        "interface": interface,
        "files": files,
        "export": export,
        "trained_with": trained_with,
    }


def markdown(card: dict[str, Any]) -> str:
    """The card for people (model_card.md)."""
    model, metrics, interface = card["model"], card["metrics"], card["interface"]
    test, threshold = metrics["test"], metrics["threshold"]
    lines = [
        f"# Model card: {model['name']}",
        "",
        f"{model['architecture']}, exported from the checkpoint with md5 "
        f"`{model['checkpoint_md5']}` ({model['parameters']:,} parameters).",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limits",
        "",
        *(f"- {limit}" for limit in card["limits"]),
        "",
        "## Metrics (test split; threshold chosen on the validation split)",
        "",
        "| AUROC | accuracy | balanced accuracy | threshold | rule | TTA |",
        "|---:|---:|---:|---:|---|---|",
        f"| {test['auroc']:.4f} | {test['accuracy']:.4f} | {test['balanced_accuracy']:.4f} | "
        f"{threshold['value']:.4f} | {threshold['rule']} | {metrics['tta']} |",
        "",
        f"Majority-class baseline accuracy: {metrics['baseline_accuracy']:.4f}. "
        f"Validation AUROC: {metrics['valid_auroc']:.4f}.",
        "",
        "## Interface",
        "",
        f"- input `{interface['input']['name']}`: {interface['input']['dtype']} "
        f"{' x '.join(map(str, interface['input']['shape']))} ({interface['input']['layout']})",
        f"- output `{interface['output']['name']}`: {interface['output']['dtype']} "
        f"{' x '.join(map(str, interface['output']['shape']))} ({interface['output']['meaning']})",
        f"- {interface['preprocessing']}",
        "",
        "## Data",
        "",
        f"Source: {card['data']['source']}. Files (md5):",
        "",
        *(f"- `{name}`: `{md5}`" for name, md5 in sorted(card["data"]["md5"].items())),
        "",
        "## Files",
        "",
        "| file | what | bytes | md5 |",
        "|---|---|---:|---|",
        *(
            f"| `{name}` | {entry['what']} | {entry['bytes']:,} | `{entry['md5']}` |"
            for name, entry in sorted(card["files"].items())
        ),
        "",
        "## Export",
        "",
        *(f"- {key}: {value}" for key, value in sorted(card["export"].items())),
        "",
    ]
    return "\n".join(lines)
