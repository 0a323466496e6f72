"""ONNX files of the model: the fp32 graph from torch, the int8 one from ONNX Runtime's static
quantisation, and running either on the CPU.

The fp32 graph comes from the TorchScript-based exporter (`dynamo=False`), which writes the same
bytes for the same model (the dynamo exporter's differed between two exports, and put the
weights in a second file). Quantisation calibrates on ONNX Runtime, whose float kernels differ
in the last bits between CPUs (AVX2, AVX-512); each calibrated range is widened to a value with
a 5-bit mantissa before it enters the file, so those last-bit differences do not reach the
scales, and the int8 file is the same on every x86-64 CPU (docs/export.md says how rarely that
rounding could still tell two CPUs apart).
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export.graph import INPUT_NAME, OUTPUT_NAME
from pcam_pipeline.params import Int8Params

# The ops whose int8 kernels pay: the convolutions and the matrix products. The rest (pooling,
# the normalisation, TTA's reshuffles) stay in float between them.
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
RANGE_MANTISSA_BITS = 5


def onnx_bytes(module: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """The module as an ONNX model with a dynamic batch axis, weights inside the file. The
    producer version is torch's public one: its +cpu build and PyPI's CUDA build write the
    same graph and must write the same bytes."""
    import onnx
    from packaging.version import Version

    buffer = io.BytesIO()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_version = Version(model.producer_version).public
    return model.SerializeToString()


def session(model: Path | bytes, threads: int = 0) -> object:
    """An ONNX Runtime CPU session (threads 0: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(model: object, blocks: Iterable[np.ndarray]) -> np.ndarray:
    """Probabilities for uint8 (B,96,96,3) blocks, in order, from an ONNX Runtime session."""
    outputs = [model.run([OUTPUT_NAME], {INPUT_NAME: block})[0] for block in blocks]  # type: ignore[attr-defined]
    return np.concatenate(outputs).astype(np.float64) if outputs else np.empty(0)


def widen(low: float, high: float, bits: int = RANGE_MANTISSA_BITS) -> tuple[float, float]:
    """[low, high] widened outward to values with a `bits`-bit mantissa (at most 2**-bits
    wider at each end): last-bit differences in the calibration do not change the result."""

    def outward(value: float, up: bool) -> float:
        if value == 0 or not math.isfinite(value):
            return value
        mantissa, exponent = math.frexp(abs(value))  # abs(value) = mantissa * 2**exponent
        steps = mantissa * 2**bits
        steps = math.ceil(steps) if (value > 0) == up else math.floor(steps)
        return math.copysign(math.ldexp(steps, exponent - bits), value)

    return outward(low, up=False), outward(high, up=True)


class _Patches:
    """ONNX Runtime's CalibrationDataReader over uint8 patches, a block at a time."""

    def __init__(self, patches: np.ndarray, block: int) -> None:
        self._blocks: Iterator[np.ndarray] = iter(
            [patches[i : i + block] for i in range(0, len(patches), block)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        block = next(self._blocks, None)
        return None if block is None else {INPUT_NAME: block}


def quantize(fp32: Path, out: Path, calibration: np.ndarray, params: Int8Params) -> dict:
    """The int8 model of `fp32` at `out`, calibrated (MinMax) on `calibration` patches; returns
    the calibrated ranges as written (tensor -> [low, high]), for the record."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pcam-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared))
        except Exception as exc:  # ONNX Runtime raises plain Exceptions from its optimiser
            raise PipelineError(
                f"{fp32}: ONNX Runtime cannot prepare the graph for quantisation ({exc}); "
                "set export.opset to another value, or export another architecture"
            ) from None
        calibrator = create_calibrator(
            prepared,
            QUANTIZED_OPS,
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrator.collect_data(_Patches(calibration, block=64))
        measured = calibrator.compute_data()
        ranges = {
            name: widen(float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in sorted(measured.data.items())
        }
        cache = Path(work) / "ranges.json"
        save_tensors_data(
            TensorsData(
                CalibrationMethod.MinMax,
                {
                    name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                    for name, (low, high) in ranges.items()
                },
            ),
            cache,
        )
        quantize_static(
            str(prepared),
            str(out),
            calibration_data_reader=None,
            calibration_cache_path=str(cache),
            quant_format=QuantFormat.QOperator if params.format == "qoperator" else QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=params.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {name: [low, high] for name, (low, high) in ranges.items()}
