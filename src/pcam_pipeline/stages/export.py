"""export: the best checkpoint as its users run it, under models/export/.

ONNX fp32 (uint8 patches in, probability out, normalisation and TTA inside), ONNX int8,
TorchScript with a WSInfer config, a Triton/KServe model repository and the model card, each
checked against torch on the test split before anything is kept (`export.build`). Writes
reports/export.json (file sizes and the checks passed). The files are written in a temporary
directory that replaces models/export/ only when all of them passed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export.build import Evaluation, TrainedModel, export_model
from pcam_pipeline.inference import predict_split, trained_model
from pcam_pipeline.params import Params
from pcam_pipeline.paths import BEST_CHECKPOINT, EXPORT_DIR, EXPORT_REPORT, METRICS_FILE
from pcam_pipeline.repro import md5_file, read_json, write_json
from pcam_pipeline.runtime import processed_data

log = logging.getLogger(__name__)
BLOCK = 256  # patches per ONNX Runtime call when checking parity


def model_to_export(params: Params) -> TrainedModel:
    model, mean, std, checkpoint = trained_model(torch.device("cpu"))
    trained = checkpoint["params"]["train"]
    architecture = trained["model"]
    if architecture == "timm":
        architecture = f"timm/{trained['timm']['name']}"
    if trained["model"] != params.train.model or (
        trained["model"] == "timm" and trained["timm"]["name"] != params.train.timm.name
    ):
        raise PipelineError(
            f"{BEST_CHECKPOINT} holds a {architecture} model, but params.yaml's train.model says "
            f"{params.train.model}: train again (`dvc repro train`) or set train.* back"
        )
    stats_path = processed_data().stats_path
    if not stats_path.is_file():
        raise PipelineError(
            f"{stats_path}: not found. Fix: run preprocess (`dvc repro preprocess`)"
        )
    stats = read_json(stats_path)
    if not all(
        np.array_equal(np.float32(stats[key]), saved.numpy())
        for key, saved in (("mean", mean), ("std", std))
    ):
        raise PipelineError(
            f"{BEST_CHECKPOINT} was trained with other channel statistics than {stats_path}: "
            "the checkpoint is from other data. Fix: train again (`dvc repro train`)"
        )
    return TrainedModel(model.eval(), mean, std, architecture, md5_file(BEST_CHECKPOINT))


def main(params: Params) -> None:
    trained = model_to_export(params)
    metrics = read_json(METRICS_FILE)
    if metrics.get("tta") != params.export.tta:
        raise PipelineError(
            f"{METRICS_FILE}: the threshold was chosen under evaluate.tta '{metrics.get('tta')}',"
            f" but export.tta is '{params.export.tta}': set the two alike in params.yaml"
        )
    dataset = processed_data()
    test = Split.open(dataset.split_path("test"), params.loader)
    valid = Split.open(dataset.split_path("valid"), params.loader)
    torch_probs = predict_split(
        trained.model,
        DeviceBatches(test, torch.device("cpu"), params.loader),
        trained.mean,
        trained.std,
        BLOCK,
        tta=params.export.tta,
    )
    generator = np.random.default_rng(params.export.int8.seed)
    count = min(params.export.int8.calibration_patches, valid.length)
    chosen = torch.from_numpy(np.sort(generator.choice(valid.length, count, replace=False)))
    calibration = next(valid.batches(chosen, count))[0].numpy()

    def test_blocks() -> Iterator[np.ndarray]:
        """The test split in file order, a block at a time (a PCAM-sized split is 0.9 GB)."""
        return (x.numpy() for x, _ in test.batches(torch.arange(test.length), BLOCK))

    evaluation = Evaluation(test_blocks, test.labels.astype(int), calibration, metrics)
    data = {"source": params.fetch.source, "md5": dataset.md5s("train", "valid", "test")}
    EXPORT_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=EXPORT_DIR.parent) as work:
        staged = Path(work) / "export"
        staged.mkdir()
        report = export_model(trained, evaluation, torch_probs, params.export, data, staged)
        shutil.rmtree(EXPORT_DIR, ignore_errors=True)
        staged.rename(EXPORT_DIR)
    write_json(EXPORT_REPORT, report)
    log.info("exported %s to %s: %s", trained.architecture, EXPORT_DIR, ", ".join(report["files"]))
