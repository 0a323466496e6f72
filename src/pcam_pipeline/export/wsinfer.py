"""The model in WSInfer's format: a TorchScript file and its `config.json` (spec 1.0).

WSInfer (and QuPath's WSInfer extension) reads each patch from the slide at
`spacing_um_px`, applies the config's transforms (Resize to the patch size, ToTensor, Normalize
with the train split's channel statistics: the preprocessing training used), runs the
TorchScript module and takes the sigmoid of its one output column.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.export.graph import NormalisedLogit

SPEC_VERSION = "1.0"
CLASS_NAMES = ["tumor"]  # one output: the probability of tumour tissue in the patch centre


def torchscript_bytes(model: torch.nn.Module, tta: str) -> bytes:
    """`NormalisedLogit` traced and saved through memory (a path would enter the archive),
    without its debug records."""
    module = NormalisedLogit(model, tta).eval()
    example = torch.zeros((2, PATCH_SHAPE[2], *PATCH_SHAPE[:2]))
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False, _store_inputs=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return without_debug_records(buffer.getvalue())


def without_debug_records(archive: bytes) -> bytes:
    """A TorchScript archive less its `*.debug_pkl` records: the source ranges of the traced
    code, which name the absolute paths of the project's and torch's files (another clone or
    venv, other bytes). Loading and running need none of them; the writer is torch's own, so
    the archive keeps its layout."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(archive))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if not name.endswith(".debug_pkl"):
            record = reader.get_record(name)
            writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()


def config(architecture: str, stats: dict[str, Any], spacing_um_px: float) -> dict[str, Any]:
    """WSInfer's model config: what to read from a slide, and how to prepare it."""
    size = PATCH_SHAPE[0]
    return {
        "spec_version": SPEC_VERSION,
        "architecture": architecture,
        "num_classes": len(CLASS_NAMES),
        "class_names": CLASS_NAMES,
        "patch_size_pixels": size,
        "spacing_um_px": spacing_um_px,
        "transform": [
            {"name": "Resize", "arguments": {"size": size}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": stats["mean"], "std": stats["std"]}},
        ],
    }
