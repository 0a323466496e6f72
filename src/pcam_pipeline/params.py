"""Typed view of params.yaml: the only module that reads it.

Each stage gets its own frozen section. Unknown keys and bad values are rejected with the key's
dotted path, what was found, and what is allowed, so a typo in params.yaml (or in
`dvc exp run -S ...`) fails before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pcam_pipeline.paths import PARAMS_FILE

# A launcher (distributed.launch) hands the params it validated to the training workers it
# starts, as JSON in this variable: every worker trains with exactly those, whichever file they
# came from, and no file has to be written where every node can read it.
LAUNCHED_PARAMS_ENV = "PCAM_LAUNCHED_PARAMS"


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds a bad key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuParams(_Section):
    # portable: the same bits on every x86-64 CPU with AVX2, for any thread count (numerics.py);
    # native: each library's fastest kernels, reproducible on one CPU model and thread count.
    numerics: Literal["portable", "native"]


class SplitSizes(_Section):
    train: int = Field(gt=0)
    valid: int = Field(gt=0)
    test: int = Field(gt=0)


class FetchParams(_Section):
    source: Literal["synthetic", "zenodo", "path"]
    # zenodo/path: the directory holding the six files (data/raw after `pcam download`, or the
    # cluster's shared copy). Not a DVC dependency: fetch verifies every file against
    # `checksums`, which is one, so the lock pins the data without DVC hashing 7 GB again.
    input: str = Field(min_length=1)
    seed: int
    sizes: SplitSizes
    positive_fraction: float = Field(gt=0, lt=1)
    zenodo_url: str
    # md5sum-format file with the md5 of every file fetch takes (and of each .gz download):
    # data/pcam.md5 is the published release's; a mirror that re-packed the files has its own
    checksums: str = Field(min_length=1)
    link: Literal["hardlink", "copy"]


class ValidateParams(_Section):
    black_level: int = Field(ge=0, le=255)
    white_level: int = Field(ge=0, le=255)
    max_blank_fraction: float = Field(ge=0, le=1)
    max_class_imbalance: float = Field(ge=0, le=0.5)
    max_duplicate_fraction: float = Field(ge=0, le=1)
    fail_on_leakage: bool
    allow_unsafe_dtype: bool
    allow_single_class: bool  # true: a split holding one class only is a warning, not fatal
    block_patches: int = Field(gt=0)


class PreprocessParams(_Section):
    drop_blank: bool
    # contiguous: x written once, in file order, its md5 known as written (DVC reads nothing
    # back); chunked: x in chunks of chunk_patches, the layout compression needs
    layout: Literal["contiguous", "chunked"]
    chunk_patches: int = Field(gt=0)
    compression: Literal["none", "lzf", "gzip"]
    block_patches: int = Field(gt=0)

    @model_validator(mode="after")
    def _compression_needs_chunks(self) -> PreprocessParams:
        if self.layout == "contiguous" and self.compression != "none":
            raise ValueError(
                f"compression '{self.compression}' needs layout 'chunked' (HDF5 compresses "
                "chunk by chunk); set preprocess.layout: chunked, or compression: none"
            )
        return self


class LoaderParams(_Section):
    in_memory: bool
    max_memory_fraction: float = Field(gt=0, le=1)
    block_patches: int = Field(gt=0)
    num_workers: int = Field(ge=0)  # streaming only: processes reading blocks ahead
    device_memory_fraction: float = Field(ge=0, le=1)  # CUDA: a split on the GPU within this


class CnnParams(_Section):
    channels: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)


class MlpParams(_Section):
    hidden_sizes: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)


WEIGHTS_DIR = "weights"  # pretrained weights, DVC-tracked; the train stage depends on it
WEIGHTS_SUFFIX = ".safetensors"


class TimmParams(_Section):
    """A model from timm (PyTorch Image Models) by its name, e.g. resnet18, efficientnet_b0, or
    vit_small_patch16_224 (built for 96x96 patches), with one output logit."""

    name: str = Field(min_length=1)
    # null: random initialisation; else a file under weights/ made by `pcam weights download`
    pretrained: str | None
    drop_rate: float = Field(ge=0, lt=1)  # dropout before the classifier
    drop_path_rate: float = Field(ge=0, lt=1)  # stochastic depth, where the model has it

    @field_validator("pretrained")
    @classmethod
    def _pretrained_is_a_weights_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if path.parent != Path(WEIGHTS_DIR) or path.suffix != WEIGHTS_SUFFIX:
            raise ValueError(
                f"must be null or a file {WEIGHTS_DIR}/<name>{WEIGHTS_SUFFIX} (as `pcam weights "
                "download` writes it, which the train stage depends on)"
            )
        return value


# What checkpoints written before train.timm existed were trained with: no timm model at all.
TIMM_UNUSED = TimmParams(name="resnet18", pretrained=None, drop_rate=0.0, drop_path_rate=0.0)


class AugmentParams(_Section):
    flip: bool
    rot90: bool


class TrainParams(_Section):
    model: Literal["cnn", "mlp", "timm"]
    cnn: CnnParams
    mlp: MlpParams
    timm: TimmParams = TIMM_UNUSED
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    optimizer: Literal["adamw", "sgd"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    momentum: float = Field(ge=0, lt=1)
    schedule: Literal["constant", "cosine", "step", "onecycle", "plateau"]
    warmup_epochs: int = Field(ge=0)
    step_size: int = Field(gt=0)
    gamma: float = Field(gt=0, le=1)
    # plateau: epochs in a row without a new best val_loss before each decay. The default is
    # for checkpoints written before the key existed (they were trained with 1).
    plateau_patience: int = Field(default=1, ge=1)
    grad_clip: float = Field(ge=0)  # 0 turns clipping off
    balanced_sampler: bool
    augment: AugmentParams
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool  # bf16 autocast, CUDA only
    compile: Literal["off", "default", "reduce-overhead"]  # torch.compile of the train step
    # Training processes (DDP): N, or auto = every visible GPU (one on the CPU). In a Slurm
    # allocation of several tasks, one per task.
    devices: Literal["auto"] | Annotated[int, Field(ge=1)]
    select_metric: Literal["val_auroc", "val_loss", "val_accuracy"]
    # dvclive's per-step series (gradient norm, learning rate) every N optimiser steps; 0 = off.
    # Logging only: no part of a checkpoint or of what a run may resume from.
    log_every_steps: int = Field(default=10, ge=0)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off_is_a_word(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (as in `dvc exp run -S train.compile=off`) as false.
        return "off" if value is False else value


class EvaluateParams(_Section):
    threshold_rule: Literal["youden", "f1", "fixed"]
    fixed_threshold: float = Field(gt=0, lt=1)
    n_slices: int = Field(ge=2)
    calibration_bins: int = Field(ge=2)
    n_error_examples: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    # test-time augmentation: the mean probability over none, the 4 flips, or all 8 symmetries
    tta: Literal["none", "flips", "d8"]


class BenchmarkParams(_Section):
    batch_sizes: list[int] = Field(min_length=1)
    devices: list[Literal["cpu", "cuda"]] = Field(min_length=1)
    precisions: list[Literal["fp32", "bf16"]] = Field(min_length=1)
    warmup_iters: int = Field(ge=0)
    timed_iters: int = Field(gt=0)
    latency_iters: int = Field(gt=1)
    loader_patches: int = Field(gt=0)
    baseline_patches: int = Field(gt=0)
    # The architectures whose training loop is timed, one row each: `train` (the model train.*
    # configures), `cnn`, `mlp`, or a timm model's name (train.timm's other settings)
    models: list[str] = Field(min_length=1)


class Int8Params(_Section):
    # qoperator: QLinearConv and friends (ONNX Runtime's fused int8 kernels); qdq: Quantize/
    # DequantizeLinear pairs around float ops, the portable form other runtimes fold
    format: Literal["qoperator", "qdq"]
    per_channel: bool  # a weight scale per output channel rather than per tensor
    calibration_patches: int = Field(gt=0)  # a seeded subset of the valid split
    seed: int
    max_auroc_drop: float = Field(ge=0, le=1)  # int8 test AUROC below fp32's by more fails


class ExportParams(_Section):
    # ONNX opset of the TorchScript-based exporter (same bytes on every run; docs/export.md)
    opset: int = Field(ge=13, le=20)
    # Test-time augmentation baked into the graph; the card's threshold was chosen under
    # evaluate.tta, so the two must agree (checked by the stage)
    tta: Literal["none", "flips", "d8"]
    parity_tolerance: float = Field(gt=0, lt=1)  # max |p_onnx - p_torch| on the test split
    int8: Int8Params
    spacing_um_px: float = Field(gt=0)  # micrometres per pixel the patches were cut at
    max_batch_size: int = Field(gt=0)  # serving engines: the largest batch they form
    max_queue_delay_us: int = Field(ge=0)  # serving engines: how long a batch may wait to fill


class ExportBenchParams(_Section):
    # the exported model (ONNX fp32, int8) against torch eager, timed at these batch sizes
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    rounds: int = Field(gt=0)  # each round times every engine once; the median is kept


class ServeParams(_Section):
    # `pcam serve`: binding beyond loopback needs a bearer token (docs/serving.md)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    precision: Literal["fp32", "int8"]  # which exported ONNX file is served
    max_batch_size: int = Field(gt=0)  # concurrent requests are batched up to this many patches
    max_queue_delay_us: int = Field(ge=0)  # how long a batch waits to fill once a request is in
    max_patches: int = Field(gt=0)  # per request
    max_body_mb: float = Field(gt=0)  # per request; larger bodies are refused unread
    # drift over a rolling window of requests, with a reference (docs/drift.md); 0 turns it off
    drift_window: int = Field(ge=0)  # the last this many sampled patches are tested
    # at most this many patches a second enter the window (their features cost ~1 ms each: the
    # CPU the window takes stays bounded whatever the request rate)
    drift_patches_per_s: float = Field(gt=0)
    drift_min_patches: int = Field(gt=1)  # no test before the window holds this many


class DriftParams(_Section):
    # drift_reference and `pcam drift` (docs/drift.md)
    reference_patches: int = Field(gt=1)  # seeded sample of the train split: image features
    model_patches: int = Field(gt=1)  # seeded sample of valid: confidences, embeddings
    input_patches: int = Field(gt=1)  # pcam drift tests at most this many (a seeded sample)
    seed: int
    alpha: float = Field(gt=0, lt=1)  # the false-alarm rate over all tests together
    correction: Literal["holm", "bonferroni"]  # for the number of tests
    mmd_permutations: int = Field(gt=0)  # the embedding MMD's permutation p-value
    batch_size: int = Field(gt=0)  # patches per forward pass for the embeddings


class Params(_Section):
    cpu: CpuParams
    fetch: FetchParams
    validate_: ValidateParams = Field(alias="validate")
    preprocess: PreprocessParams
    loader: LoaderParams
    train: TrainParams
    evaluate: EvaluateParams
    benchmark: BenchmarkParams
    export: ExportParams
    export_bench: ExportBenchParams
    serve: ServeParams
    drift: DriftParams

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    location = ".".join(str(part) for part in error["loc"] if part != "__root__")
    location = location.replace("validate_", "validate")
    if error["type"] == "extra_forbidden":
        parent_loc, key = error["loc"][:-1], error["loc"][-1]
        allowed = _allowed_keys(model, parent_loc)
        return f"{location}: unknown key '{key}'; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    found = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "model_attributes_type" or isinstance(found, dict):
        return f"{location or '<top level>'}: {message}"
    return f"{location}: {message} (found {found!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        field = fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        current = field.annotation
    return [f.alias or name for name, f in current.model_fields.items()]


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validate an already-loaded params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, found {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {_describe(err, Params)}" for err in exc.errors()]
        raise ParamsError(f"{source} is not valid:\n" + "\n".join(lines)) from None


def overridden(section: BaseModel, options: Mapping[str, Any], source: str) -> Any:
    """A params section with command-line options over it, validated as the file is."""
    chosen = {key: value for key, value in options.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **chosen})
    except ValidationError as exc:
        lines = [f"  {_describe(err, type(section))}" for err in exc.errors()]
        raise ParamsError(f"{source} is not valid:\n" + "\n".join(lines)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: not found; run from the repository root (where dvc.yaml is)"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))


def launched_params(environ: Mapping[str, str]) -> Params | None:
    """The params a launcher handed this training worker, or None when none started it."""
    text = environ.get(LAUNCHED_PARAMS_ENV)
    if text is None:
        return None
    return parse_params(json.loads(text), f"${LAUNCHED_PARAMS_ENV} (set by the launcher)")
