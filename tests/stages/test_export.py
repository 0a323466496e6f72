"""The export stage: every file it writes, checked with the runtimes and schemas of the tools
that read them (ONNX Runtime, WSInfer's config schema, Triton's ModelConfig), byte-identical
across runs and thread counts, and refusing what it cannot export faithfully."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.evaluation.metrics import auroc
from pcam_pipeline.export import build, onnx_model
from pcam_pipeline.export.graph import PatchClassifier
from pcam_pipeline.inference import model_from_checkpoint, predict_batches
from pcam_pipeline.params import ParamsError
from pcam_pipeline.paths import EXPORT_DIR, EXPORT_REPORT
from tests.conftest import REPO_ROOT
from tests.tiny_pipeline import (
    CALIBRATION,
    export_params,
    raw_params,
    run_export,
    small_run_params,
    tree_bytes,
    workdir,
)


def test_pcam_names_export_a_stage():
    from pcam_pipeline import cli

    assert "export" in cli.STAGES
    assert cli.build_parser().parse_args(["export"]).command == "export"


def test_every_file_is_written_and_named_by_the_card(exported_run):
    export = exported_run / EXPORT_DIR
    card = json.loads((export / build.CARD_JSON).read_text())
    assert set(card["files"]) == set(build.WHAT)
    for name, entry in card["files"].items():
        data = (export / name).read_bytes()
        assert (len(data), hashlib.md5(data).hexdigest()) == (entry["bytes"], entry["md5"]), name
    checkpoint = (exported_run / "models" / "best.pt").read_bytes()
    assert card["model"]["checkpoint_md5"] == hashlib.md5(checkpoint).hexdigest()
    metrics = json.loads((exported_run / "reports" / "metrics.json").read_text())
    assert card["metrics"]["threshold"] == metrics["threshold"]
    assert card["metrics"]["test"]["auroc"] == metrics["test"]["auroc"]
    assert card["data"]["source"] == "synthetic" and "test.h5" in card["data"]["md5"]
    assert "synthetic" in card["limits"][0]
    markdown = (export / build.CARD_MD).read_text()
    assert "Intended use" in markdown and card["model"]["checkpoint_md5"] in markdown
    report = json.loads((exported_run / EXPORT_REPORT).read_text())
    assert report["files"]["model.onnx"] == card["files"]["model.onnx"]["bytes"]
    assert report["threshold"] == metrics["threshold"]["value"]


def test_onnx_gives_the_probabilities_pcam_predict_gives(exported_run, tiny_data):
    model, mean, std, _ = model_from_checkpoint(
        exported_run / "models/best.pt", torch.device("cpu")
    )
    with h5py.File(tiny_data / "test.h5", "r") as handle:
        patches, labels = handle["x"][...], handle["y"][...]
    ours = predict_batches(model, [torch.from_numpy(patches)], mean, std, torch.device("cpu"))
    fp32 = onnx_model.session(exported_run / EXPORT_DIR / build.FP32_FILE)
    int8 = onnx_model.session(exported_run / EXPORT_DIR / build.INT8_FILE)
    # One patch at a time and all at once: the batch axis is dynamic.
    single = onnx_model.onnx_probabilities(fp32, [patches[i : i + 1] for i in range(len(patches))])
    whole = onnx_model.onnx_probabilities(fp32, [patches])
    assert np.max(np.abs(single - ours)) <= 1e-5 and np.max(np.abs(whole - ours)) <= 1e-5
    quantized = onnx_model.onnx_probabilities(int8, [patches])
    assert auroc(labels, quantized) >= auroc(labels, whole) - 0.02
    inputs, outputs = fp32.get_inputs()[0], fp32.get_outputs()[0]
    assert (inputs.name, inputs.type, inputs.shape[1:]) == ("patches", "tensor(uint8)", [96, 96, 3])
    assert (outputs.name, outputs.type, len(outputs.shape)) == ("probability", "tensor(float)", 1)


@pytest.mark.parametrize("tta", ["flips", "d8"])
def test_tta_in_the_graph_is_evaluates_tta(trained_run, tiny_data, tta):
    model, mean, std, _ = model_from_checkpoint(trained_run / "models/best.pt", torch.device("cpu"))
    with h5py.File(tiny_data / "test.h5", "r") as handle:
        patches = torch.from_numpy(handle["x"][:16])
    expected = predict_batches(model, [patches], mean, std, torch.device("cpu"), tta=tta)
    graph = PatchClassifier(model, mean, std, tta).eval()
    with torch.no_grad():
        assert torch.allclose(graph(patches).double(), torch.from_numpy(expected), atol=1e-6)
    session = onnx_model.session(onnx_model.onnx_bytes(graph, patches[:2], 17))
    onnx_probs = onnx_model.onnx_probabilities(session, [patches.numpy()])
    assert np.max(np.abs(onnx_probs - expected)) <= 1e-5


def test_pcam_export_writes_the_same_bytes_at_any_thread_count(exported_run, tiny_data, tmp_path):
    """Two `pcam export` processes, one and two threads (TorchScript names a class it traces
    again in one process anew, so each run is a process of its own, as under `dvc repro`)."""
    runs = []
    for threads in ("1", "2"):
        run = shutil.copytree(exported_run, tmp_path / f"threads-{threads}")
        shutil.rmtree(run / EXPORT_DIR)
        (run / "params.yaml").write_text(yaml.safe_dump(raw_params(export=CALIBRATION)))
        env = {**os.environ, "PCAM_TRAIN_DATA_DIR": str(tiny_data), "OMP_NUM_THREADS": threads}
        result = subprocess.run(
            [sys.executable, "-m", "pcam_pipeline.cli", "export"],
            cwd=run, env=env, capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(run)
    one, two = runs
    assert tree_bytes(one / EXPORT_DIR) == tree_bytes(two / EXPORT_DIR)
    assert (one / EXPORT_REPORT).read_bytes() == (two / EXPORT_REPORT).read_bytes()


def test_wsinfer_reads_the_config_and_the_torchscript_module(exported_run, tiny_data):
    import jsonschema
    import wsinfer
    from wsinfer_zoo.client import ModelConfiguration

    export = exported_run / EXPORT_DIR
    config = json.loads((export / build.WSINFER_CONFIG_FILE).read_text())
    schema = Path(wsinfer.__file__).parent / "schemas" / "model-config.schema.json"
    jsonschema.validate(config, json.loads(schema.read_text()))
    parsed = ModelConfiguration.from_dict(config)
    assert (parsed.patch_size_pixels, parsed.spacing_um_px, parsed.num_classes) == (96, 1.0, 1)
    module = torch.jit.load(export / build.TORCHSCRIPT_FILE)
    with h5py.File(tiny_data / "test.h5", "r") as handle:
        patches = handle["x"][:8]
    # WSInfer's transforms, as it builds them from the config (torchvision, on PIL images)
    from PIL import Image
    from wsinfer.modellib.transforms import make_compose_from_transform_config

    transform = make_compose_from_transform_config(parsed.transform)
    images = torch.stack([transform(Image.fromarray(p)) for p in patches])
    logits = module(images)
    assert logits.shape == (8, 1)
    fp32 = onnx_model.session(export / build.FP32_FILE)
    expected = onnx_model.onnx_probabilities(fp32, [patches])
    assert np.max(np.abs(torch.sigmoid(logits[:, 0]).detach().numpy() - expected)) <= 1e-5


def test_triton_reads_the_repository_config(exported_run):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repository = exported_run / EXPORT_DIR / build.REPOSITORY_DIR / "pcam"
    config = text_format.Parse(
        (repository / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (config.name, config.platform, config.max_batch_size) == (
        "pcam",
        "onnxruntime_onnx",
        256,
    )
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (tensor,) = config.input
    assert (tensor.name, list(tensor.dims)) == ("patches", [96, 96, 3])
    assert tensor.data_type == model_config_pb2.TYPE_UINT8
    (output,) = config.output
    assert (output.name, list(output.dims), list(output.reshape.shape)) == ("probability", [1], [])
    model = repository / "1" / "model.onnx"
    assert model.read_bytes() == (exported_run / EXPORT_DIR / build.FP32_FILE).read_bytes()


def test_range_widening_is_outward_and_absorbs_last_bit_differences():
    low, high = onnx_model.widen(-0.123456, 7.654321)
    assert low <= -0.123456 and high >= 7.654321
    assert high <= 7.654321 * (1 + 2**-5) and low >= -0.123456 * (1 + 2**-5)
    assert onnx_model.widen(0.0, 7.654321 * (1 + 1e-7)) == (0.0, high)
    assert onnx_model.widen(-0.123456 * (1 - 1e-7), 1.0) == (low, 1.0)


# --- what the stage refuses ---------------------------------------------------------------------


def test_a_checkpoint_of_another_architecture_is_named(exported_run, tiny_data, tmp_path):
    from pcam_pipeline.stages import export as stage

    with workdir(shutil.copytree(exported_run, tmp_path / "run"), tiny_data):
        params = small_run_params(train={"model": "mlp"}, export=CALIBRATION)
        with pytest.raises(PipelineError, match=r"holds a cnn model, but .*train.model says mlp"):
            stage.main(params)


def test_a_missing_stats_file_is_named(exported_run, tiny_data, tmp_path):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / "stats.json").unlink()
    with pytest.raises(PipelineError, match=r"stats.json: not found. Fix: run preprocess"):
        run_export(shutil.copytree(exported_run, tmp_path / "run"), data)


def test_export_tta_must_be_the_thresholds_tta(exported_run, tiny_data, tmp_path):
    with pytest.raises(PipelineError, match=r"evaluate.tta 'none', but export.tta is 'd8'"):
        run_export(shutil.copytree(exported_run, tmp_path / "run"), tiny_data, tta="d8")


def test_an_opset_outside_the_exporters_range_is_a_params_error():
    with pytest.raises(
        ParamsError, match=r"export.opset: Input should be less than or equal to 20"
    ):
        export_params(opset=23)


class DataDependent(nn.Module):
    """A layer whose Python branch on the data is baked in by tracing: it exports wrongly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if float(x.mean()) > -1.0:  # the exporter traces one branch: the blank example's
            return logits
        return -logits


def test_a_model_that_exports_wrongly_fails_and_keeps_nothing(exported_run, tiny_data, tmp_path):
    model, mean, std, _ = model_from_checkpoint(
        exported_run / "models/best.pt", torch.device("cpu")
    )
    with h5py.File(tiny_data / "test.h5", "r") as handle:
        patches, labels = handle["x"][...], handle["y"][...]
    wrong = DataDependent(model).eval()
    expected = predict_batches(wrong, [torch.from_numpy(patches)], mean, std, torch.device("cpu"))
    trained = build.TrainedModel(wrong, mean, std, "cnn", "0" * 32)
    metrics = json.loads((exported_run / "reports" / "metrics.json").read_text())
    evaluation = build.Evaluation(lambda: [patches], labels, patches[:8], metrics)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"ONNX fp32 gives probabilities up to .* nothing was"):
        build.export_model(trained, evaluation, expected, export_params().export, {}, out)
    assert list(out.iterdir()) == [], "nothing written before the checks passed"


# --- the offline bundle -------------------------------------------------------------------------


def pcam_bundle(cwd: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.cli", "bundle", str(target)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_bundle_is_the_export_plus_a_runner_and_the_same_tarball_twice(exported_run, tmp_path):
    run = shutil.copytree(exported_run, tmp_path / "run")
    shutil.copy(REPO_ROOT / "requirements-runtime.lock", run)
    first = pcam_bundle(run, tmp_path / "one" / "pcam-model")
    assert first.returncode == 0, first.stderr
    second = pcam_bundle(run, tmp_path / "two" / "pcam-model")
    bundle = tmp_path / "one" / "pcam-model"
    tarball = bundle.with_name("pcam-model.tar.gz")
    assert tarball.read_bytes() == (tmp_path / "two" / "pcam-model.tar.gz").read_bytes()
    assert second.returncode == 0
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"pcam_runner.py", "requirements.txt", "README.md", "model.onnx"} <= names
    assert set(json.loads((bundle / build.CARD_JSON).read_text())["files"]) <= names
    with tarfile.open(tarball) as tar:
        assert {m.name for m in tar.getmembers()} == {f"pcam-model/{n}" for n in names}
    pins = (bundle / "requirements.txt").read_text().split()
    assert [pin.split("==")[0] for pin in pins] == ["numpy", "pillow", "onnxruntime"]


def test_the_bundle_refuses_an_export_that_is_not_the_cards(exported_run, tmp_path):
    run = shutil.copytree(exported_run, tmp_path / "run")
    shutil.copy(REPO_ROOT / "requirements-runtime.lock", run)
    (run / EXPORT_DIR / build.INT8_FILE).write_bytes(b"not the model")
    result = pcam_bundle(run, tmp_path / "bundle")
    assert result.returncode == 1
    assert "model.int8.onnx: missing or not the file the model card names" in result.stderr
    assert "dvc repro export" in result.stderr and not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("train", "data"),
    [
        ({"model": "mlp"}, "tiny_data"),
        # timm_data's 16 test patches: one pair ranked the other way moves the AUROC by 1/64
        ({"model": "timm", "epochs": 1, "batch_size": 32}, "timm_data"),
    ],
    ids=["mlp", "timm-resnet18"],
)
def test_every_architecture_exports_with_parity(train, data, request, tmp_path):
    from pcam_pipeline.stages import evaluate
    from pcam_pipeline.stages import export as stage
    from tests.tiny_pipeline import train_in

    data_dir = request.getfixturevalue(data)
    params = small_run_params(
        train=train, export={"int8": {"calibration_patches": 16, "max_auroc_drop": 0.1}}
    )
    run = train_in(tmp_path, data_dir, params)
    with workdir(run, data_dir):
        evaluate.main(params)
        stage.main(params)
    card = json.loads((run / EXPORT_DIR / build.CARD_JSON).read_text())
    expected = "pcam-timm/resnet18" if train["model"] == "timm" else "pcam-mlp"
    assert card["model"]["architecture"] == expected
    model, mean, std, _ = model_from_checkpoint(run / "models/best.pt", torch.device("cpu"))
    with h5py.File(data_dir / "test.h5", "r") as handle:
        patches = handle["x"][...]
    ours = predict_batches(model, [torch.from_numpy(patches)], mean, std, torch.device("cpu"))
    fp32 = onnx_model.session(run / EXPORT_DIR / build.FP32_FILE)
    assert np.max(np.abs(onnx_model.onnx_probabilities(fp32, [patches]) - ours)) <= 1e-5
