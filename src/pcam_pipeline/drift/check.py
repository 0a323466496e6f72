"""`pcam drift INPUT --out FILE.json`: test patches against the model's drift reference.

INPUT: a PCAM-format HDF5 file, a folder of patch images (drift/inputs.py), or `pcam slides`'
OUT/patches/<slide>.h5, whose patches are read from the slide itself (drift/slide.py).

Image features always; the model's confidence and embeddings (MMD) where the checkpoint the
reference was written with is at hand. Writes the JSON report, prints a table, draws the
reference-vs-input histograms, and returns the exit code: 0 no drift, EXIT_DRIFT (3) drift;
bad input raises PipelineError (the CLI's 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.drift.detector import EXIT_DRIFT, DriftReport, Sample, detect
from pcam_pipeline.drift.features import FEATURES, macenko_vectors, patch_features, stain_angles
from pcam_pipeline.drift.inputs import read_input
from pcam_pipeline.drift.profile import CONFIDENCE, Reference, confidence, load_reference
from pcam_pipeline.drift.slide import is_patch_file, read_slide_patches
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import DriftParams
from pcam_pipeline.repro import atomic_path, md5_file, write_json


@dataclasses.dataclass(frozen=True)
class DriftOptions:
    reference: Path  # the directory holding reference.json and reference.npz
    checkpoint: Path  # the model the reference was written with; absent: image tests only
    plots: Path  # the directory of the histograms
    slide: Path | None = None  # the slide of a patches/<slide>.h5 INPUT, where it has moved


def model_sample(
    patches: np.ndarray, checkpoint: Path, reference: Reference, batch_size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The input's confidences and embeddings from the reference's own model."""
    recorded = reference.meta.get("model_md5")
    if md5_file(checkpoint) != recorded:
        raise PipelineError(
            f"{checkpoint}: not the model the reference was written with (md5 {recorded}). "
            "Fix: give that checkpoint (--checkpoint), or write the reference with this model "
            "(`dvc repro drift_reference`)"
        )
    import torch

    from pcam_pipeline.drift.reference import embed
    from pcam_pipeline.inference import model_from_checkpoint

    device = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(checkpoint, device)
    probabilities, embeddings = embed(model, patches, mean, std, device, batch_size)
    return {CONFIDENCE: confidence(probabilities)}, embeddings


def drift_of(
    patches: np.ndarray, reference: Reference, params: DriftParams, checkpoint: Path | None
) -> DriftReport:
    """Every test of `patches` against `reference`; the model's where `checkpoint` is given."""
    table = patch_features(patches, reference.stain_vectors)
    univariate = {name: table.values[:, i] for i, name in enumerate(FEATURES)}
    embeddings, notes = None, []
    if checkpoint is not None and checkpoint.is_file():
        scored, embeddings = model_sample(patches, checkpoint, reference, params.batch_size)
        univariate.update(scored)
    else:
        notes.append(f"model tests (confidence, embedding MMD) skipped: no checkpoint {checkpoint}")
    report = detect(
        reference.sample(embeddings is not None, embeddings is not None),
        Sample(univariate, embeddings),
        params.alpha,
        params.correction,
        params.mmd_permutations,
        params.seed,
        notes,
    )
    angles = stain_angles(macenko_vectors(patches, params.seed), reference.stain_vectors)
    return dataclasses.replace(
        report,
        stain_vector_angles_deg={"hematoxylin": float(angles[0]), "eosin": float(angles[1])},
    )


def histograms(reference: Reference, patches: np.ndarray, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = patch_features(patches, reference.stain_vectors).values
    columns = 4
    rows = -(-len(FEATURES) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 3, rows * 2.4), squeeze=False)
    for axis in axes.flat[len(FEATURES) :]:
        axis.axis("off")
    for i, (axis, name) in enumerate(zip(axes.flat, FEATURES, strict=False)):
        both = np.concatenate([reference.features[:, i], values[:, i]])
        edges = np.histogram_bin_edges(both, bins=30)
        axis.hist(reference.features[:, i], bins=edges, density=True, alpha=0.5, label="reference")
        axis.hist(values[:, i], bins=edges, density=True, alpha=0.5, label="input")
        axis.set_title(name, fontsize=8)
        axis.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def read_patches(
    source: Path, slide: Path | None, params: DriftParams
) -> tuple[np.ndarray, dict[str, Any]]:
    """The input's patches, and what the report adds about where they came from."""
    if is_patch_file(source):
        patches, slide = read_slide_patches(source, slide, params.input_patches, params.seed)
        return patches, {"slide": str(slide)}
    if slide is not None:
        raise PipelineError(
            f"{source}: --slide goes with a slide's patch file (`pcam slides`' "
            "OUT/patches/<slide>.h5, key coords), and this is not one. Fix: drop --slide"
        )
    return read_input(source, params.input_patches, params.seed), {}


def main(source: Path, out: Path, options: DriftOptions, params: DriftParams) -> int:
    reference = load_reference(options.reference)
    patches, origin = read_patches(source, options.slide, params)
    report = drift_of(patches, reference, params, options.checkpoint)
    write_json(
        out,
        {
            **report.as_dict(),
            "input": str(source),
            **origin,
            "input_patches": len(patches),
            "reference": str(options.reference),
            "reference_model_md5": reference.meta.get("model_md5"),
        },
    )
    figure = histograms(reference, patches, f"{source}: {'DRIFT' if report.drift else 'no drift'}")
    plot = options.plots / f"{source.stem or source.name}.png"
    with atomic_path(plot) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    print(report.table())
    print(f"drift: {out} and {plot}")
    return EXIT_DRIFT if report.drift else 0
