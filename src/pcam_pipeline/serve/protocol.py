"""The Open Inference Protocol's infer request and response (KServe V2, REST), for the one model
served: JSON tensors, and the binary tensor data extension tritonclient uses by default (a JSON
header of `Inference-Header-Content-Length` bytes, then each binary tensor's bytes in order).

Every check names the field and the fix; the caller turns `BadRequest` into a 4xx JSON error."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pcam_pipeline.serve.model import MODEL_NAME

PATCH = (96, 96, 3)
HEADER_LENGTH = "inference-header-content-length"
EXAMPLE = (
    '{"inputs": [{"name": "patches", "shape": [N, 96, 96, 3], "datatype": "UINT8", '
    '"data": [...N*27648 values 0..255...]}]}'
)


class BadRequest(Exception):
    """A request refused with `status` (4xx); the message names the field and the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    patches: np.ndarray  # uint8 (N, 96, 96, 3)
    request_id: str | None
    binary_output: bool


def parse_json(text: bytes, what: str) -> Any:
    if not text.strip():
        raise BadRequest(f"{what}: empty; send an inference request: {EXAMPLE}")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(
            f"{what}: not JSON ({exc}); send an inference request: {EXAMPLE}"
        ) from None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """(the JSON header, the binary tensor bytes after it)."""
    if header_length is None:
        return parse_json(body, "body"), b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise BadRequest(
            f"header Inference-Header-Content-Length: {header_length!r} is not a byte count "
            f"within the {len(body)}-byte body; give the JSON header's length"
        )
    return parse_json(body[:length], "JSON header"), body[length:]


def _shape(tensor: dict[str, Any], max_patches: int) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int for d in shape)):
        raise BadRequest(
            f"inputs[0].shape: {shape!r} is not a list of integers; give [N, 96, 96, 3]"
        )
    if len(shape) != 4 or tuple(shape[1:]) != PATCH:
        raise BadRequest(
            f"inputs[0].shape: {shape} is not [N, 96, 96, 3]; send uint8 RGB patches of 96x96 "
            "pixels, height, width, channels (PCAM's stored form)"
        )
    if not 1 <= shape[0] <= max_patches:
        raise BadRequest(
            f"inputs[0].shape: {shape[0]} patches; send 1 to {max_patches} per request "
            "(split larger sets over several requests)",
            status=413 if shape[0] > max_patches else 400,
        )
    return tuple(shape)


def _json_data(data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest("inputs[0].data: missing or not a list; give the pixel values 0..255")
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise BadRequest(
            "inputs[0].data: not a (nested) list of numbers; give the pixel values 0..255"
        ) from None
    if values.size != count:
        raise BadRequest(
            f"inputs[0].data: {values.size} values for shape of {count} elements; send "
            "N*96*96*3 values, row-major"
        )
    if np.isnan(values).any():
        raise BadRequest(f"inputs[0].data[{int(np.argmax(np.isnan(values)))}]: NaN; send 0..255")
    bad = (values < 0) | (values > 255) | (values != np.floor(values))
    if bad.any():
        at = int(np.argmax(bad))
        raise BadRequest(
            f"inputs[0].data[{at}]: {values[at]!r} is not a UINT8 pixel value; send integers 0..255"
        )
    return values.astype(np.uint8)


def parse_infer(header: Any, binary: bytes, input_name: str, max_patches: int) -> InferRequest:
    """The patches of a V2 infer request, every field checked."""
    if not isinstance(header, dict):
        raise BadRequest(f"body: a JSON {type(header).__name__}, expected an object: {EXAMPLE}")
    inputs = header.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise BadRequest(f"inputs: give exactly one input tensor, {input_name!r}: {EXAMPLE}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise BadRequest(
            f"inputs[0].name: {tensor.get('name')!r}; this model's input is {input_name!r}"
        )
    if tensor.get("datatype") != "UINT8":
        raise BadRequest(
            f"inputs[0].datatype: {tensor.get('datatype')!r}; the model takes UINT8 patches "
            "(pixel values 0..255, as PCAM stores them)"
        )
    shape = _shape(tensor, max_patches)
    count = math.prod(shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count or len(binary) != count:
            raise BadRequest(
                f"inputs[0].parameters.binary_data_size: {size} (and {len(binary)} bytes after "
                f"the JSON header) for a UINT8 tensor of {count} elements; send one byte per "
                "element"
            )
        values = np.frombuffer(binary, dtype=np.uint8)
    else:
        if binary:
            raise BadRequest("body: bytes after the JSON header but no binary_data_size; set it")
        values = _json_data(tensor.get("data"), count)
    binary_output = bool((header.get("parameters") or {}).get("binary_data_output", False))
    for index, output in enumerate(header.get("outputs") or []):
        if not isinstance(output, dict) or output.get("name") != "probability":
            raise BadRequest(f"outputs[{index}].name: this model's only output is 'probability'")
        binary_output = bool((output.get("parameters") or {}).get("binary_data", binary_output))
    request_id = header.get("id")
    return InferRequest(
        patches=values.reshape(shape),
        request_id=request_id if isinstance(request_id, str) else None,
        binary_output=binary_output,
    )


def binary_request(patches: np.ndarray, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """A client's infer request for uint8 (N, 96, 96, 3) patches with binary tensor data, as
    tritonclient sends it: (body, headers). The load test and the tests send it."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "patches",
                    "shape": list(patches.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": patches.size},
                }
            ],
            "outputs": [{"name": "probability", "parameters": {"binary_data": binary_output}}],
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + np.ascontiguousarray(patches, dtype=np.uint8).tobytes(), headers


def infer_response(
    request: InferRequest, probabilities: np.ndarray, version: str, output_name: str
) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of the V2 infer response."""
    output: dict[str, Any] = {
        "name": output_name,
        "datatype": "FP32",
        "shape": [len(probabilities)],
    }
    raw = np.ascontiguousarray(probabilities, dtype="<f4")
    if request.binary_output:
        output["parameters"] = {"binary_data_size": raw.nbytes}
    else:
        output["data"] = raw.tolist()
    response: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "model_version": version,
        "outputs": [output],
    }
    if request.request_id is not None:
        response["id"] = request.request_id
    header = json.dumps(response).encode()
    if not request.binary_output:
        return header, {"content-type": "application/json"}
    return header + raw.tobytes(), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
