"""drift_reference: the reference profile pcam drift and pcam serve test inputs against, written
with the model it belongs to (models/drift/, docs/drift.md)."""

from __future__ import annotations

from pcam_pipeline.drift.reference import build_reference
from pcam_pipeline.inference import trained_model
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BEST_CHECKPOINT, DRIFT_DIR
from pcam_pipeline.repro import md5_file
from pcam_pipeline.runtime import processed_data, resolve_device


def main(params: Params) -> None:
    device = resolve_device(params.train.device)
    model, mean, std, _ = trained_model(device)
    reference = build_reference(
        processed_data(), model, mean, std, device, params.drift, md5_file(BEST_CHECKPOINT)
    )
    reference.save(DRIFT_DIR)
    meta = reference.meta
    print(
        f"drift_reference: {meta['feature_patches']} train patches, {meta['model_patches']} "
        f"valid patches ({meta['embedding_dim']}-d embeddings) -> {DRIFT_DIR}/"
    )
