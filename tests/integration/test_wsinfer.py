"""WSInfer's own runner on the exported model: `wsinfer run` with models/export/wsinfer/'s
TorchScript and config.json scores whole slides, and each patch's probability equals the
project's own scoring of the same pixels (`pcam predict`'s code, and the CLI) within 1e-5.

Two slides: a synthetic pyramidal TIFF at 1 um/px (tests/slide_files.py), where WSInfer reads
96 x 96 patches at level 0 and the expected pixels are known exactly; and OpenSlide's CC0
CMU-1-Small-Region.svs at 0.499 um/px (tests/fixtures/README.md), where WSInfer reads 192 x 192
regions and resizes them to 96.

WSInfer 0.6.1 (the newest release) runs as users run it, the `wsinfer` console script of the
development environment, offline (`wsinfer_env`). It needs zarr 2: its package __init__ imports
zarr.storage.KVStore (to patch a zarr 2 bug for tiffslide 2), which zarr 3 removed, so with
tiffslide 3 (which requires zarr 3) `wsinfer` stops with ImportError before doing anything;
hence pyproject.toml's tiffslide<3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tiffslide
import torch
from torchvision import transforms

from pcam_pipeline.inference import model_from_checkpoint, predict_batches
from tests.integration.conftest import project_env, run_command
from tests.slide_files import slide_pixels, write_test_slide

pytestmark = pytest.mark.heavy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CMU_SLIDE = FIXTURES / "cmu_small_region.svs"
SYNTHETIC = "synthetic"
SYNTHETIC_SIZE = (2048, 1536)  # width, height at level 0
TOLERANCE = 1e-5


def wsinfer_env(home: Path) -> dict[str, str]:
    """WSInfer's environment: offline, on the CPU, its caches in `home`.

    Importing WSInfer's CLI loads the WSInfer model zoo's registry (to offer `--model` names):
    `hf_hub_download` of a JSON file from the Hugging Face hub into ~/.wsinfer-zoo, even when
    `--model-path`/`--config` name a local model. Offline (HF_HUB_OFFLINE=1) the hub client
    uses the file already there, so an empty registry there makes the run independent of the
    network and of the user's home directory.
    """
    registry = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps({"models": {}}))
    return project_env(HOME=str(home), HF_HUB_OFFLINE="1", WSINFER_FORCE_CPU="1")


@pytest.fixture(scope="module")
def wsinfer_results(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `wsinfer run` over both slides: its results directory."""
    base = tmp_path_factory.mktemp("wsinfer")
    slides = base / "slides"  # WSInfer wants a directory of nothing but slides
    slides.mkdir()
    write_test_slide(slides / f"{SYNTHETIC}.tif", *SYNTHETIC_SIZE, mpp=1.0, seed=0)
    shutil.copy2(CMU_SLIDE, slides / CMU_SLIDE.name)
    results = base / "results"
    # --num-workers 1, not 0: WSInfer 0.6.1 hands num_workers to the GeoJSON writer's process
    # pool too, and ProcessPoolExecutor(max_workers=0) raises after the CSVs are written.
    command = [
        "wsinfer", "run",
        "--wsi-dir", slides,
        "--results-dir", results,
        "--model-path", exported["torchscript"],
        "--config", exported["config"],
        "--num-workers", "1",
    ]  # fmt: skip
    run_command(command, cwd=base, env=wsinfer_env(base / "home"), timeout=300)
    return results


def wsinfer_scores(results: Path, slide: str) -> pd.DataFrame:
    table = pd.read_csv(results / "model-outputs-csv" / f"{slide}.csv")
    assert list(table.columns) == ["minx", "miny", "width", "height", "prob_tumor"]
    return table


def check_geojson(results: Path, slide: str, table: pd.DataFrame) -> None:
    """WSInfer's GeoJSON (for QuPath) has one tile per CSV row, with the CSV's probability."""
    geojson = json.loads((results / "model-outputs-geojson" / f"{slide}.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) == len(table)
    tiles = set()
    for feature in geojson["features"]:
        xs, ys = zip(*feature["geometry"]["coordinates"][0], strict=True)
        prob = feature["properties"]["measurements"]["prob_tumor"]
        tiles.add((int(min(xs)), int(min(ys)), int(max(xs) - min(xs)), prob))
    rows = zip(table.minx, table.miny, table.width, table.prob_tumor, strict=True)
    assert tiles == {(int(x), int(y), int(w), float(p)) for x, y, w, p in rows}


def export_tta(exported: dict[str, Path]) -> str:
    """The test-time augmentation baked into the TorchScript: the project scores with it too."""
    return json.loads(exported["report"].read_text()).get("tta", "none")


def project_probabilities(exported: dict[str, Path], patches: np.ndarray) -> np.ndarray:
    """What `pcam predict` computes for uint8 (N,96,96,3) patches, at full precision."""
    device = torch.device("cpu")
    model, mean, std, _ = model_from_checkpoint(exported["checkpoint"], device)
    batches = [torch.from_numpy(patches)]
    return predict_batches(model, batches, mean, std, device, tta=export_tta(exported))


def pcam_predict_probabilities(
    exported: dict[str, Path], patches: np.ndarray, tmp_path: Path
) -> np.ndarray:
    """The same patches through the `pcam predict` CLI (an HDF5 file of them, a CSV back)."""
    inputs, out = tmp_path / "patches.h5", tmp_path / "scores.csv"
    with h5py.File(inputs, "w") as handle:
        handle.create_dataset("x", data=patches)
    command = ["pcam", "predict", exported["checkpoint"], inputs, "--out", out, "--device", "cpu"]
    run_command([*command, "--tta", export_tta(exported)], cwd=tmp_path, env=project_env())
    table = pd.read_csv(out)
    assert list(table.patch) == [f"{inputs}[{i}]" for i in range(len(patches))]
    return table.probability.to_numpy()


def compare(
    slide: str, table: pd.DataFrame, patches: np.ndarray, exported: dict[str, Path], tmp_path
) -> None:
    ours = project_probabilities(exported, patches)
    theirs = table.prob_tumor.to_numpy()
    delta = np.abs(theirs - ours)
    cli = pcam_predict_probabilities(exported, patches, tmp_path)
    # `pcam predict` writes 6 decimals: up to 5e-7 of rounding on top of the model's agreement.
    cli_delta = np.abs(cli - ours)
    print(
        f"{slide}: {len(table)} patches of {table.width[0]} px, p in "
        f"[{theirs.min():.4f}, {theirs.max():.4f}], max |p_wsinfer - p_pcam| = {delta.max():.3g}, "
        f"max |p_pcam_predict_csv - p_pcam| = {cli_delta.max():.3g}"
    )
    worst = int(delta.argmax())
    assert delta.max() <= TOLERANCE, (
        f"{slide}: patch {worst} at ({table.minx[worst]}, {table.miny[worst]}): "
        f"WSInfer {theirs[worst]}, pcam {ours[worst]}"
    )
    assert cli_delta.max() <= TOLERANCE
    # Distinct patches must get distinct scores: a model (or a reader) that ignored its input
    # would otherwise pass on a slide of similar patches.
    assert np.ptp(ours) > 1e-3


def test_wsinfer_scores_a_synthetic_slide_as_the_project_does(
    exported: dict[str, Path], wsinfer_results: Path, tmp_path: Path
):
    table = wsinfer_scores(wsinfer_results, SYNTHETIC)
    check_geojson(wsinfer_results, SYNTHETIC, table)
    # At the model's spacing (1 um/px) WSInfer reads 96 x 96 at level 0 and its Resize(96) is
    # the identity, so the expected patches are plain crops of the pixels the slide was made of.
    assert set(table.width) == set(table.height) == {96}
    pixels = slide_pixels(*SYNTHETIC_SIZE, seed=0)
    patches = np.stack(
        [pixels[y : y + 96, x : x + 96] for x, y in zip(table.minx, table.miny, strict=True)]
    )
    # Patches only where the tissue is: WSInfer's segmentation found the blobs, not the
    # background. Background pixels are grey (R = G = B); tissue is saturated.
    centres = patches[:, 40:56, 40:56].astype(int)
    tissue = (centres.max(axis=-1) - centres.min(axis=-1)) > 20
    assert tissue.mean(axis=(1, 2)).min() > 0.5
    assert len(table) > 10
    # ... and in both blobs, one left of the slide's middle and one right of it.
    middle = SYNTHETIC_SIZE[0] // 2
    assert (table.minx < middle).any() and (table.minx > middle).any()
    compare(SYNTHETIC, table, patches, exported, tmp_path)


def test_wsinfer_scores_a_real_aperio_slide_as_the_project_does(
    exported: dict[str, Path], wsinfer_results: Path, tmp_path: Path
):
    table = wsinfer_scores(wsinfer_results, CMU_SLIDE.stem)
    check_geojson(wsinfer_results, CMU_SLIDE.stem, table)
    config = json.loads(exported["config"].read_text())
    assert [t["name"] for t in config["transform"]] == ["Resize", "ToTensor", "Normalize"]
    # 96 px at 1 um/px is round(96 / 0.499) = 192 px at the slide's 0.499 um/px.
    assert set(table.width) == set(table.height) == {192}
    assert len(table) > 10
    # The patch WSInfer feeds its transforms, made the way WSInfer makes it: the region read at
    # level 0 with tiffslide, as RGB, then torchvision's own Resize from the config on the PIL
    # image (PIL's antialiased bilinear). A 2x2 mean or every other pixel changes most pixel
    # values, and the probabilities far beyond the tolerance: this way the test compares the
    # models, not two resamplers.
    resize = transforms.Resize(**config["transform"][0]["arguments"])
    slide = tiffslide.TiffSlide(CMU_SLIDE)
    patches = np.stack(
        [
            np.asarray(resize(slide.read_region((x, y), 0, (w, h)).convert("RGB")))
            for x, y, w, h in zip(table.minx, table.miny, table.width, table.height, strict=True)
        ]
    )
    slide.close()
    assert patches.shape[1:] == (96, 96, 3) and patches.dtype == np.uint8
    compare(CMU_SLIDE.stem, table, patches, exported, tmp_path)
