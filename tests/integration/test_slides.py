"""`pcam slides` with the pipeline's own exported model (the shared `make run`, trained on the
synthetic generator's patches): on a generated slide whose right tissue blob is the generator's
positive texture and whose left blob its negative one (tests/slide_files.py: tumour_slide_pixels),
the hot patches, the area above the model card's threshold and the heatmap's hot colours are in
the right blob. In-process (run.main), so that coverage counts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcam_pipeline.slides import run
from tests.slide_files import tumour_slide_pixels, write_test_slide

pytestmark = pytest.mark.heavy

SIZE = (2048, 1536)


def test_the_hot_region_is_where_the_positive_texture_is(exported: dict[str, Path], tmp_path: Path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_test_slide(slides / "tumour.tif", *SIZE, pixels=tumour_slide_pixels(*SIZE, seed=0))
    out = tmp_path / "out"
    run.main(slides, out, run.Options(exported["config"].parent, card=exported["card"]))
    patches = pd.read_csv(out / "model-outputs-csv" / "tumour.csv")
    right = (patches.minx + patches.width / 2) > SIZE[0] // 2
    hot, cold = patches.prob_tumor[right], patches.prob_tumor[~right]
    print(
        f"tumour.tif: {len(patches)} patches, mean p in the positive blob {hot.mean():.3f}, "
        f"in the negative blob {cold.mean():.3f}"
    )
    assert hot.mean() - cold.mean() > 0.3
    summary = json.loads((out / "summaries" / "tumour.json").read_text())
    card = json.loads(exported["card"].read_text())
    assert summary["threshold"] == card["metrics"]["threshold"]["value"]
    above = patches.prob_tumor >= summary["threshold"]
    assert summary["patches_above_threshold"] == above.sum()
    assert above[right].mean() > 0.6 and above[~right].mean() < 0.2
    # The heatmap's hot colours (inferno's yellow: red and green high) sit in the right half.
    heat = np.asarray(Image.open(out / "heatmaps" / "tumour.png")).astype(int)
    yellow = (heat[..., 0] > 200) & (heat[..., 1] > 150) & (heat[..., 2] < 150)
    columns = np.nonzero(yellow)[1]
    print(f"heatmap: {len(columns)} hot pixels, {np.mean(columns > heat.shape[1] / 2):.2f} right")
    assert len(columns) > 100 and (columns > heat.shape[1] / 2).mean() > 0.8
