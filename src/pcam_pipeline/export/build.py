"""Every exported file from one trained model, checked before it is kept.

`export_model` writes the fp32 and int8 ONNX graphs, the TorchScript module with its WSInfer
config, the Triton/KServe repository and the model card into a directory, after checking that
each runtime gives the probabilities torch gives (fp32 and TorchScript within
`export.parity_tolerance`, int8 within `export.int8.max_auroc_drop` of fp32's test AUROC). A
model that fails a check raises PipelineError and nothing is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.evaluation.metrics import auroc
from pcam_pipeline.export import card, onnx_model, triton, wsinfer
from pcam_pipeline.export.graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    PatchClassifier,
    batchnorm_folded,
)
from pcam_pipeline.params import ExportParams

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CALIBRATION_FILE = "int8_calibration.json"
TORCHSCRIPT_FILE = "wsinfer/torchscript_model.pt"
WSINFER_CONFIG_FILE = "wsinfer/config.json"
REPOSITORY_DIR = "repository"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
WHAT = {
    FP32_FILE: "ONNX fp32: uint8 patches in, probability out (the served default)",
    INT8_FILE: "ONNX int8 (static quantisation, calibrated on the valid split)",
    CALIBRATION_FILE: "the int8 calibration ranges, as written",
    TORCHSCRIPT_FILE: "TorchScript for WSInfer: standardised patches in, logit out",
    WSINFER_CONFIG_FILE: "WSInfer model config (spec 1.0)",
    f"{REPOSITORY_DIR}/{triton.MODEL_NAME}/config.pbtxt": "Triton/KServe model config",
    f"{REPOSITORY_DIR}/{triton.MODEL_NAME}/{triton.VERSION}/{triton.MODEL_FILE}": (
        "the fp32 ONNX graph in the Triton/KServe repository"
    ),
}


@dataclass(frozen=True)
class TrainedModel:
    """What export needs of a training run."""

    model: nn.Module  # on the CPU, in eval mode
    mean: torch.Tensor
    std: torch.Tensor
    architecture: str  # e.g. "cnn", "timm/resnet18"
    checkpoint_md5: str


@dataclass(frozen=True)
class Evaluation:
    """The test split's patches (uint8 blocks, in file order) and labels, the valid split's
    calibration patches, and evaluate's metrics (its threshold, its TTA)."""

    test_blocks: Callable[[], Iterable[np.ndarray]]
    test_labels: np.ndarray
    calibration: np.ndarray
    metrics: dict[str, Any]


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def versions() -> dict[str, str]:
    """The exporter's and runtimes' releases (public versions: torch's +cpu build and PyPI's
    CUDA build export the same bytes, and the card must not tell them apart)."""
    from packaging.version import Version

    return {
        name: Version(metadata.version(name)).public for name in ("torch", "onnx", "onnxruntime")
    }


def interface(tta: str) -> dict[str, Any]:
    return {
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", *PATCH_SHAPE],
            "layout": "N patches, height, width, RGB channels: PCAM's stored form",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N"],
            "meaning": "probability of tumour tissue in the patch centre",
        },
        "preprocessing": (
            "none outside the graph: scaling to [0, 1], standardisation with the train split's "
            f"channel statistics, channels-first and the test-time augmentation ({tta}) are in it"
        ),
    }


def check_parity(name: str, ours: np.ndarray, reference: np.ndarray, tolerance: float) -> float:
    worst = float(np.max(np.abs(ours - reference))) if len(ours) else 0.0
    if not worst <= tolerance:  # NaN fails too
        raise PipelineError(
            f"{name} gives probabilities up to {worst:.3g} away from torch's on the test split "
            f"(export.parity_tolerance: {tolerance:g}): the export is wrong for this "
            "architecture, so nothing was written. Fix: try another export.opset; if it stays, "
            "the architecture has a layer the exporter translates wrongly (docs/export.md)"
        )
    return worst


def checked_graphs(
    trained: TrainedModel, evaluation: Evaluation, torch_probs: np.ndarray, params: ExportParams
) -> tuple[dict[str, bytes], np.ndarray]:
    """The fp32 ONNX graph and the TorchScript module, each checked against torch, with the
    WSInfer config and the Triton repository: (file name -> bytes, ONNX fp32's probabilities)."""
    folded = batchnorm_folded(trained.model)
    graph = PatchClassifier(folded, trained.mean, trained.std, params.tta).eval()
    example = torch.zeros((2, *PATCH_SHAPE), dtype=torch.uint8)
    try:
        fp32 = onnx_model.onnx_bytes(graph, example, params.opset)
    except Exception as exc:  # the exporter raises many kinds for one unsupported op
        raise PipelineError(
            f"torch.onnx cannot export {trained.architecture} at opset {params.opset} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); set export.opset to "
            "another value between 13 and 20 in params.yaml"
        ) from None
    onnx_probs = onnx_model.onnx_probabilities(onnx_model.session(fp32), evaluation.test_blocks())
    worst = check_parity("ONNX fp32", onnx_probs, torch_probs, params.parity_tolerance)
    log.info("ONNX fp32 against torch on %d test patches: max |dp| %.3g", len(onnx_probs), worst)
    scripted = wsinfer.torchscript_bytes(trained.model, params.tta)
    check_parity(
        "The TorchScript module",
        torchscript_probabilities(scripted, evaluation.test_blocks(), trained.mean, trained.std),
        torch_probs,
        params.parity_tolerance,
    )
    stats = {"mean": trained.mean.tolist(), "std": trained.std.tolist()}
    repository = f"{REPOSITORY_DIR}/{triton.MODEL_NAME}"
    files = {
        FP32_FILE: fp32,
        TORCHSCRIPT_FILE: scripted,
        WSINFER_CONFIG_FILE: json_bytes(
            wsinfer.config(f"pcam-{trained.architecture}", stats, params.spacing_um_px)
        ),
        f"{repository}/config.pbtxt": triton.config_pbtxt(
            params.max_batch_size, params.max_queue_delay_us
        ).encode(),
        f"{repository}/{triton.VERSION}/{triton.MODEL_FILE}": fp32,
    }
    return files, onnx_probs


def checked_int8(
    out: Path, evaluation: Evaluation, fp32_probs: np.ndarray, params: ExportParams
) -> dict[str, bytes]:
    """The int8 model of `out`'s fp32 one, written beside it and checked against fp32's test
    AUROC, with its calibrated ranges."""
    ranges = onnx_model.quantize(
        out / FP32_FILE, out / INT8_FILE, evaluation.calibration, params.int8
    )
    int8_probs = onnx_model.onnx_probabilities(
        onnx_model.session(out / INT8_FILE), evaluation.test_blocks()
    )
    check_int8(evaluation.test_labels, fp32_probs, int8_probs, params.int8.max_auroc_drop)
    calibration = {"method": "MinMax", "patches": len(evaluation.calibration), "ranges": ranges}
    return {INT8_FILE: (out / INT8_FILE).read_bytes(), CALIBRATION_FILE: json_bytes(calibration)}


def export_model(
    trained: TrainedModel,
    evaluation: Evaluation,
    torch_probs: np.ndarray,
    params: ExportParams,
    data: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """Write every exported file into the empty directory `out` (the caller keeps it only if
    this returns); return reports/export.json."""
    written, fp32_probs = checked_graphs(trained, evaluation, torch_probs, params)
    for name, content in written.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    int8 = checked_int8(out, evaluation, fp32_probs, params)
    (out / CALIBRATION_FILE).write_bytes(int8[CALIBRATION_FILE])
    written.update(int8)

    files = {
        name: {"what": WHAT[name], "bytes": len(content), "md5": md5_bytes(content)}
        for name, content in sorted(written.items())
    }
    export_facts = {
        "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)",
        "opset": params.opset,
        "int8": f"{params.int8.format}, per-channel {params.int8.per_channel}, uint8 activations,"
        f" int8 weights, MinMax on {len(evaluation.calibration)} valid patches",
        "served_default": FP32_FILE,
        **{f"{name}_version": version for name, version in versions().items()},
    }
    model_card = card.model_card(
        identity={
            "name": "pcam-classifier",
            "architecture": f"pcam-{trained.architecture}",
            "checkpoint_md5": trained.checkpoint_md5,
            "parameters": sum(p.numel() for p in trained.model.parameters()),
        },
        data=data,
        metrics=evaluation.metrics,
        interface=interface(params.tta),
        files=files,
        export=export_facts,
        trained_with={
            "normalisation": {"mean": trained.mean.tolist(), "std": trained.std.tolist()},
            "tta": params.tta,
        },
    )
    (out / CARD_JSON).write_bytes(json_bytes(model_card))
    (out / CARD_MD).write_text(card.markdown(model_card))
    return {
        "files": {name: entry["bytes"] for name, entry in files.items()},
        "parity": {
            "tolerance": params.parity_tolerance,
            "test_patches": len(torch_probs),
            "checked": ["onnx_fp32", "torchscript", "onnx_int8_auroc"],
            "int8_max_auroc_drop": params.int8.max_auroc_drop,
        },
        "opset": params.opset,
        "tta": params.tta,
        "threshold": evaluation.metrics["threshold"]["value"],
    }


def check_int8(labels: np.ndarray, fp32: np.ndarray, int8: np.ndarray, max_drop: float) -> None:
    drop = auroc(labels, fp32) - auroc(labels, int8)
    if not drop <= max_drop:
        raise PipelineError(
            f"the int8 model's test AUROC is {drop:.4f} below fp32's (export.int8.max_auroc_drop:"
            f" {max_drop}): nothing was written. Fix: calibrate on more patches "
            "(export.int8.calibration_patches), set export.int8.per_channel: true, or raise the "
            "allowed drop"
        )


def torchscript_probabilities(
    scripted: bytes, blocks: Iterable[np.ndarray], mean: torch.Tensor, std: torch.Tensor
) -> np.ndarray:
    """What WSInfer computes from the TorchScript file: ToTensor, Normalize, sigmoid."""
    module = torch.jit.load(io.BytesIO(scripted), map_location="cpu")
    outputs = []
    with torch.no_grad():
        for block in blocks:
            images = torch.from_numpy(block).permute(0, 3, 1, 2).float().div(255)
            images = images.sub(mean.view(1, -1, 1, 1)).div(std.view(1, -1, 1, 1))
            outputs.append(torch.sigmoid(module(images).squeeze(1)))
    return torch.cat(outputs).double().numpy() if outputs else np.empty(0)


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
