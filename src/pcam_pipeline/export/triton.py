"""A model repository as Triton Inference Server and KServe load it: `pcam/config.pbtxt` and
`pcam/1/model.onnx` (the fp32 graph), with dynamic batching of concurrent requests."""

from __future__ import annotations

from pcam_pipeline.data.pcam import PATCH_SHAPE
from pcam_pipeline.export.graph import INPUT_NAME, OUTPUT_NAME

MODEL_NAME = "pcam"
VERSION = "1"
MODEL_FILE = "model.onnx"


def config_pbtxt(max_batch_size: int, max_queue_delay_us: int) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig). The output is one value per
    patch, shape (N,): declared as [1] and reshaped to [] (Triton's form for a batch-only axis)."""
    dims = ", ".join(str(d) for d in PATCH_SHAPE)
    return (
        f'name: "{MODEL_NAME}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_UINT8\n"
        f"    dims: [ {dims} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 1 ]\n"
        "    reshape: { shape: [ ] }\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n"
    )
