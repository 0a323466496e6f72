"""The served model: one ONNX file from the export directory, checked against its model card,
and the identity a client sees (model md5, commit, test AUROC, threshold)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.repro import md5_file

MODEL_NAME = "pcam"
CARD_FILE = "model_card.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
COMMIT_ENV = "PCAM_MODEL_COMMIT"  # the image build sets it: an image holds no git history


@dataclass(frozen=True)
class ServedModel:
    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    version: str
    threshold: float
    identity: dict[str, Any]
    card: dict[str, Any]

    def probabilities(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, 96, 96, 3) -> float32 (N,); runs on the caller's thread."""
        return self.session.run([self.output_name], {self.input_name: patches})[0]


def providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for --device auto | cpu | cuda."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise PipelineError(
            "--device cuda: this ONNX Runtime has no CUDA provider (found "
            f"{', '.join(available)}); install onnxruntime-gpu, or use --device auto"
        )
    return ["CPUExecutionProvider"]


def export_lock_md5(export_dir: Path) -> str | None:
    """The export directory's md5 as dvc.lock records it, when served from inside a project."""
    import yaml

    here = export_dir.resolve()
    root = next((p for p in here.parents if (p / "dvc.lock").is_file()), None)
    if root is None:
        return None
    try:
        stages = yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})
        outs = [out for stage in stages.values() for out in stage.get("outs", [])]
    except (yaml.YAMLError, AttributeError, TypeError):
        return None
    relative = here.relative_to(root)
    return next((out.get("md5") for out in outs if Path(out.get("path", "")) == relative), None)


def source_commit(export_dir: Path) -> str | None:
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        found = subprocess.run(
            ["git", "-C", str(export_dir), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None


def load_model(export_dir: Path, precision: str, device: str, threads: int) -> ServedModel:
    """The ONNX file for `precision`, refused unless its md5 is the one its card records (an
    edited or half-copied export is never served). Only ONNX is loaded: nothing is unpickled."""
    import onnxruntime as ort

    card_path, onnx_path = export_dir / CARD_FILE, export_dir / ONNX_FILES[precision]
    for path in (card_path, onnx_path):
        if not path.is_file():
            raise PipelineError(
                f"{path}: not found; run `dvc repro export` (or `dvc pull`), or give the "
                "exported model's directory with --export-dir"
            )
    try:
        card = json.loads(card_path.read_text())
        recorded = card["files"][ONNX_FILES[precision]]["md5"]
        threshold = float(card["metrics"]["threshold"]["value"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{card_path}: not a model card the export stage wrote ({exc!r}); "
            "run `dvc repro export`"
        ) from None
    actual = md5_file(onnx_path)
    if actual != recorded:
        raise PipelineError(
            f"{onnx_path}: md5 {actual} is not the {recorded} its model card records: the file "
            "was changed or copied incompletely; restore it (`dvc checkout models/export`)"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle ONNX Runtime threads sleep rather than spin: a server shares its cores with the event
    # loop that parses requests (and, in the load test, with the client).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=providers(device))
    identity = {
        "name": card["model"]["name"],
        "architecture": card["model"]["architecture"],
        "file": ONNX_FILES[precision],
        "precision": precision,
        "version": actual[:12],
        "md5": actual,
        "checkpoint_md5": card["model"].get("checkpoint_md5"),
        "export_md5": export_lock_md5(export_dir),
        "commit": source_commit(export_dir),
        "test_auroc": card["metrics"]["test"]["auroc"],
        "threshold": threshold,
        "providers": session.get_providers(),
    }
    return ServedModel(
        session=session,
        input_name=session.get_inputs()[0].name,
        output_name=session.get_outputs()[0].name,
        version=actual[:12],
        threshold=threshold,
        identity=identity,
        card=card,
    )
