"""`pcam slides`: whole slides through WSInfer's segmentation, patching and inference, in-process
(run.main, cli.main), with the small exported model of the fast set (tests/conftest.py's
`exported_run`, trained on the synthetic generator's patches).

Three generated slides (tests/slide_files.py) and the CC0 Aperio slide: summaries, heatmaps,
GeoJSON, the cohort table; the tissue mask matches the generated tissue (IoU). This small model
does not tell the generator's positive texture from its negative one on a slide (p about 0.59 on
both): tests/integration/test_slides.py checks the hot region with the pipeline's trained model.
A rerun skips the finished slides; an unreadable slide, a slide of no tissue and one without a
spacing are named in the error and the table, and the others are scored. `pcam drift` on a
scored slide's patches/ID.h5 reads the pixels WSInfer fed the model, finds drift on the CC0 slide
against the synthetic reference, and names a moved or wrong slide and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcam_pipeline import cli
from pcam_pipeline.errors import PipelineError, Preempted
from pcam_pipeline.slides import run
from pcam_pipeline.slides.summary import Tissue, heatmap, summarise
from tests.conftest import REPO_ROOT
from tests.slide_files import tissue_mask, tumour_slide_pixels, write_test_slide

CMU_SLIDE = REPO_ROOT / "tests" / "fixtures" / "cmu_small_region.svs"
SIZE = (2048, 1536)  # width, height: blobs big enough for WSInfer's 200 um minimum object
MIN_IOU = 0.9


@pytest.fixture(scope="module")
def model_dir(exported_run: Path) -> Path:
    return exported_run / "models" / "export" / "wsinfer"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tumour.tif (right blob positive), plain.tif (tests/slide_files.py's own texture), small.tif
    (another seed, other blobs) and the CC0 Aperio slide."""
    folder = tmp_path_factory.mktemp("slides")
    write_test_slide(folder / "tumour.tif", *SIZE, pixels=tumour_slide_pixels(*SIZE, seed=0))
    write_test_slide(folder / "plain.tif", *SIZE, seed=1)
    write_test_slide(folder / "small.tif", 1280, 1280, seed=2)
    shutil.copy2(CMU_SLIDE, folder / CMU_SLIDE.name)
    return folder


@pytest.fixture(scope="module")
def scored(slides: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scored")
    run.main(slides, out, run.Options(model_dir))
    return out


def test_every_slide_gets_a_summary_heatmap_geojson_and_a_row(scored: Path, slides: Path):
    table = pd.read_csv(scored / "cohort.csv")
    assert sorted(table.slide_id) == ["cmu_small_region", "plain", "small", "tumour"]
    assert set(table.status) == {"done"}
    assert json.loads((scored / "cohort.json").read_text())[0]["slide_id"] == table.slide_id[0]
    for slide_id in table.slide_id:
        summary = json.loads((scored / "summaries" / f"{slide_id}.json").read_text())
        patches = pd.read_csv(scored / summary["outputs"]["csv"])
        assert summary["patches"] == len(patches) > 10
        assert summary["max_probability"] == pytest.approx(patches.prob_tumor.max())
        top = np.sort(patches.prob_tumor.to_numpy())[::-1][: summary["top_k"]]
        assert summary["top_k_mean_probability"] == pytest.approx(top.mean())
        assert summary["tissue_area_mm2"] > 0
        # WSInfer's GeoJSON (QuPath's tiles): one feature per patch, with its probability.
        geojson = json.loads((scored / summary["outputs"]["geojson"]).read_text())
        probs = [f["properties"]["measurements"]["prob_tumor"] for f in geojson["features"]]
        assert probs == pytest.approx(patches.prob_tumor.tolist())
        heat = Image.open(scored / summary["outputs"]["heatmap"])
        assert heat.mode == "RGB" and max(heat.size) <= run.HEATMAP_SIDE
    cmu = json.loads((scored / "summaries" / "cmu_small_region.json").read_text())
    # 96 px at 1 um/px is 192 px at the Aperio slide's 0.499 um/px.
    assert (cmu["um_px"], cmu["patch_size_px"], cmu["spacing_from"]) == (0.499, 192, "file")
    assert not (scored / run.WORK).exists()  # no staging left behind


@pytest.mark.parametrize("slide_id,seed", [("tumour", 0), ("plain", 1), ("small", 2)])
def test_the_tissue_mask_matches_the_generated_tissue(scored: Path, slide_id: str, seed: int):
    found = np.asarray(Image.open(scored / "tissue" / f"{slide_id}.png")) > 0
    summary = json.loads((scored / "summaries" / f"{slide_id}.json").read_text())
    truth = tissue_mask(summary["width"], summary["height"], seed)
    rows = np.linspace(0, truth.shape[0] - 1, found.shape[0]).round().astype(int)
    cols = np.linspace(0, truth.shape[1] - 1, found.shape[1]).round().astype(int)
    truth = truth[np.ix_(rows, cols)]
    iou = (found & truth).sum() / (found | truth).sum()
    print(f"{slide_id}: tissue mask IoU {iou:.4f}")
    assert iou > MIN_IOU
    # 1 um/px: the mask's area is the generated tissue's pixel count, in mm^2.
    assert summary["tissue_area_mm2"] == pytest.approx(
        truth.sum() * 1e-6 * (summary["width"] * summary["height"] / truth.size), rel=0.1
    )


def test_a_rerun_skips_finished_slides_and_bad_slides_are_named(
    scored: Path, slides: Path, model_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(scored, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "summaries").iterdir()}
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    write_test_slide(
        folder / "blank.tif", 1280, 1280, pixels=np.full((1280, 1280, 3), 240, np.uint8)
    )
    write_test_slide(folder / "nospacing.tif", 1280, 1280, mpp=None, seed=3)
    listing = tmp_path / "slides.txt"
    names = [*sorted(slides.iterdir()), *sorted(folder.iterdir())]
    listing.write_text("# a cohort\n" + "\n".join(str(p) for p in names) + "\n\n")
    code = cli.main(["slides", str(listing), "--out", str(out), "--model-dir", str(model_dir)])
    assert code == 1
    error = capsys.readouterr().err
    assert "3 of 7 slide(s) not scored" in error
    for name in ("broken.svs", "blank.tif", "nospacing.tif"):
        assert str(folder / name) in error
    assert "--spacing-um-px" in error and "no tissue" in error
    after = {p.name: p.stat().st_mtime_ns for p in (out / "summaries").iterdir()}
    assert after == before  # the four finished slides were skipped, not scored again
    table = pd.read_csv(out / "cohort.csv").set_index("slide_id")
    assert (
        table.loc["broken", "status"] == "failed" and "broken.svs" in table.loc["broken", "error"]
    )
    assert table.loc["tumour", "status"] == "done"
    # Given a spacing, the slide without one is scored; its error file goes.
    code = cli.main([
        "slides", str(listing), "--out", str(out), "--model-dir", str(model_dir),
        "--spacing-um-px", "1.0", "--threshold", "0.5",
    ])  # fmt: skip
    assert code == 1
    assert (out / "summaries" / "nospacing.json").is_file()
    assert not (out / "errors" / "nospacing.json").exists()
    assert "2 of 7" in capsys.readouterr().err


def test_an_array_task_scores_its_chunk_and_the_last_job_only_tabulates(
    slides: Path, model_dir: Path, tmp_path: Path
):
    everything = sorted(slides.iterdir())
    assert run.chunk(everything, 1, 3) == everything[3:]
    with pytest.raises(PipelineError, match="array must be 0-1"):
        run.chunk(everything, 2, 3)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="4 of 4 slide"):
        run.main(slides, out, run.Options(model_dir), cohort_only=True)
    task = tmp_path / "task"
    run.main(slides, task, run.Options(model_dir, threshold=0.5), part=(3, 1))
    assert not (task / "cohort.csv").exists()  # an array task writes no table
    assert [p.stem for p in (task / "summaries").iterdir()] == [everything[3].stem]


def test_readers_and_threads_change_the_speed_not_the_probabilities(
    scored: Path, slides: Path, model_dir: Path, tmp_path: Path
):
    """The default (reading in-process, one model thread on two cores) against a reader
    process beside two model threads: the same probabilities (equal to the last bit here)."""
    assert run.model_threads(run.Options(model_dir)) == max(1, len(os.sched_getaffinity(0)) - 1)
    options = run.Options(model_dir, threshold=0.5, num_workers=1, threads=2)
    assert run.model_threads(options) == 2
    run.main(slides, tmp_path, options, part=(2, 1))
    slide_id = sorted(slides.iterdir())[2].stem
    alone = pd.read_csv(tmp_path / "model-outputs-csv" / f"{slide_id}.csv")
    pd.testing.assert_frame_equal(
        alone, pd.read_csv(scored / "model-outputs-csv" / f"{slide_id}.csv")
    )


def test_summary_and_heatmap_figures():
    tissue = Tissue(np.ones((10, 20), bool), (2.0, 3.0))
    assert tissue.area_mm2 == pytest.approx(200 * 6 / 1e6)
    got = summarise(np.array([0.1, 0.9, 0.6, 0.2]), 96, 1.0, tissue, threshold=0.5, top_k=2)
    assert got["max_probability"] == 0.9 and got["top_k_mean_probability"] == pytest.approx(0.75)
    assert got["area_above_threshold_mm2"] == pytest.approx(2 * 96**2 / 1e6)
    thumb = np.full((4, 8, 3), 100, np.uint8)
    out = heatmap(thumb, np.array([[0, 0, 40, 40]]), np.array([1.0]), (10.0, 10.0))
    assert (out[:4, :4] != 100).any() and (out[:, 4:] == 100).all()


def test_bad_lists_and_models_are_named(tmp_path: Path):
    with pytest.raises(PipelineError, match="not found"):
        run.slide_list(tmp_path / "missing")
    listing = tmp_path / "list.txt"
    listing.write_text("a/x.svs\nb/x.tif\n")
    with pytest.raises(PipelineError, match="share the ID 'x'"):
        run.slide_list(listing)
    with pytest.raises(PipelineError, match=r"config\.json: not found"):
        run.main(listing.parent, tmp_path / "out", run.Options(tmp_path))


def test_the_bench_scores_a_generated_pyramid_in_a_child_and_compares(
    exported_run: Path, tmp_path: Path
):
    from pcam_pipeline.perf import slide_scoring as bench

    out = tmp_path / "report.json"
    argv = ["--size", "2000", "--tissue-fraction", "0.2", "--compare", "64"]
    paths = ["--work", str(tmp_path / "work"), "--out", str(out)]
    report = bench.main([*argv, *paths, "--export-dir", str(exported_run / "models" / "export")])
    assert json.loads(out.read_text())["pcam_slides"] == report["pcam_slides"]
    scored = report["pcam_slides"]
    # The disc covers 20% of 4 mm^2; the patches are those whose centre is in it.
    assert scored["tissue_area_mm2"] == pytest.approx(0.8, rel=0.1)
    assert scored["patches"] == pytest.approx(0.8e6 / 96**2, rel=0.15)
    assert 0 < scored["peak_rss_mb"] < bench.MEMORY_GOAL_MB
    assert 0 < scored["peak_tree_pss_mb"] < bench.MEMORY_GOAL_MB  # with its patch reader
    assert report["compared_patches"] == 64 and report["ratio_to_onnxruntime"] > 0
    # A level below level 0 is the same picture, sampled: tissue where level 0 has it.
    picture = bench.Picture(2000, 0.2)
    assert (picture.tile(0, 0, 1) == bench.GLASS).all()
    assert (picture.tile(0, 0, 4) != bench.GLASS).any()


def test_a_stop_signal_ends_the_run_after_the_slide_in_hand(
    slides: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """SIGUSR1 (Slurm's time-limit warning) while a slide is scored: that slide is finished,
    then the run stops (exit 75 from the CLI: the Slurm task requeues) and a rerun goes on."""
    score = run.score_slide

    def score_then_signal(*args, **kwargs):
        summary = score(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return summary

    monkeypatch.setattr(run, "score_slide", score_then_signal)
    out = tmp_path / "out"
    options = run.Options(model_dir, threshold=0.5)
    with pytest.raises(Preempted):
        run.main(slides, out, options, part=(1, 2))
    assert [p.stem for p in (out / "summaries").iterdir()] == ["small"]
    monkeypatch.setattr(run, "score_slide", score)
    run.main(slides, out, options, part=(1, 2))
    assert sorted(p.stem for p in (out / "summaries").iterdir()) == ["small", "tumour"]


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The drift tests' image reference of the synthetic generator's train patches, saved."""
    from pcam_pipeline.data.synthetic import generate_split
    from tests.drift_references import REFERENCE_PATCHES, image_reference

    folder = tmp_path_factory.mktemp("drift-reference")
    image_reference(generate_split(0, "train", REFERENCE_PATCHES, 0.5)[0]).save(folder)
    return folder


def drift_cli(patches: Path, reference: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / f"{patches.stem}.json"
    code = cli.main([
        "drift", str(patches), "--out", str(out), "--reference", str(reference),
        "--checkpoint", str(tmp_path / "none.pt"), "--plots", str(tmp_path / "plots"), *extra,
    ])  # fmt: skip
    return code, out


def test_drift_reads_a_slides_patches_as_wsinfer_fed_them_to_the_model(scored: Path, slides: Path):
    import tiffslide
    from torchvision import transforms

    from pcam_pipeline.drift import slide as drift_slide

    # tumour.tif is at 1 um/px: 96 px regions, Resize(96) the identity, crops of its pixels.
    patches_file = scored / "patches" / "tumour.h5"
    patches, slide = drift_slide.read_slide_patches(patches_file, None, 16, 0)
    assert slide == (slides / "tumour.tif").resolve()
    coords, side = drift_slide.patch_grid(patches_file)
    chosen = np.sort(np.random.default_rng(0).choice(len(coords), 16, replace=False))
    pixels = tumour_slide_pixels(*SIZE, seed=0)
    assert side == 96
    assert np.array_equal(
        patches, np.stack([pixels[y : y + 96, x : x + 96] for x, y in coords[chosen]])
    )
    # The Aperio slide at 0.499 um/px: 192 px regions through torchvision's Resize(96).
    patches, _ = drift_slide.read_slide_patches(
        scored / "patches" / "cmu_small_region.h5", None, 4, 0
    )
    coords, side = drift_slide.patch_grid(scored / "patches" / "cmu_small_region.h5")
    chosen = np.sort(np.random.default_rng(0).choice(len(coords), 4, replace=False))
    reader, resize = tiffslide.TiffSlide(CMU_SLIDE), transforms.Resize(96)
    expected = [
        np.asarray(resize(reader.read_region((x, y), 0, (side, side)).convert("RGB")))
        for x, y in coords[chosen]
    ]
    reader.close()
    assert side == 192 and np.array_equal(patches, np.stack(expected))


def test_pcam_drift_on_a_slides_patches(
    scored: Path, synthetic_reference: Path, tmp_path: Path, capsys
):
    code, out = drift_cli(scored / "patches" / "tumour.h5", synthetic_reference, tmp_path)
    report = json.loads(out.read_text())
    summary = json.loads((scored / "summaries" / "tumour.json").read_text())
    flagged = [t["name"] for t in report["tests"] if t["drift"]]
    print(f"tumour.tif: {report['input_patches']} patches, drift {report['drift']}: {flagged}")
    assert code in (0, 3) and report["drift"] is (code == 3)
    assert (
        report["slide"] == summary["slide_path"] and report["input_patches"] == summary["patches"]
    )
    # Real tissue (the CC0 Aperio slide) against the synthetic reference: drift.
    code, out = drift_cli(scored / "patches" / "cmu_small_region.h5", synthetic_reference, tmp_path)
    report = json.loads(out.read_text())
    strongest = min(report["tests"], key=lambda t: t["p_value"])
    print(f"cmu_small_region.svs: strongest {strongest['name']} p={strongest['p_value']:.1e}")
    assert code == 3 and report["drift"] is True
    assert report["slide"].endswith("cmu_small_region.svs")
    assert (tmp_path / "plots" / "cmu_small_region.png").is_file()


def test_pcam_drift_names_a_moved_or_wrong_slide_and_the_fix(
    scored: Path, slides: Path, synthetic_reference: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    patches = out / "patches" / "tumour.h5"
    shutil.copy2(scored / "patches" / "tumour.h5", patches)
    assert drift_cli(patches, synthetic_reference, tmp_path)[0] == 1
    assert "summaries/tumour.json naming the slide" in capsys.readouterr().err
    small = ["--slide", str(slides / "small.tif")]  # no summary to compare: the corners tell
    assert drift_cli(patches, synthetic_reference, tmp_path, *small)[0] == 1
    assert "patches run past this one's edge" in capsys.readouterr().err
    summary = json.loads((scored / "summaries" / "tumour.json").read_text())
    (out / "summaries").mkdir()
    moved = tmp_path / "moved" / "tumour.tif"
    (out / "summaries" / "tumour.json").write_text(
        json.dumps({**summary, "slide_path": str(moved)})
    )
    assert drift_cli(patches, synthetic_reference, tmp_path)[0] == 1
    error = capsys.readouterr().err
    assert f"{moved}: not found: the slide {patches} was cut from" in error
    assert "Fix: give the slide with --slide PATH" in error
    moved.parent.mkdir()
    shutil.copy2(slides / "tumour.tif", moved)
    assert drift_cli(patches, synthetic_reference, tmp_path, "--slide", str(moved))[0] in (0, 3)
    assert drift_cli(patches, synthetic_reference, tmp_path, *small)[0] == 1
    assert "1280x1280 pixels at level 0, but" in (error := capsys.readouterr().err)
    assert "was cut from a 2048x1536 slide" in error
    assert drift_cli(CMU_SLIDE, synthetic_reference, tmp_path, "--slide", str(moved))[0] == 1
    assert "Fix: drop --slide" in capsys.readouterr().err


def test_a_patch_file_not_of_wsinfer_is_refused(tmp_path: Path):
    import h5py

    from pcam_pipeline.drift.slide import is_patch_file, patch_grid

    (tmp_path / "garbage.h5").write_bytes(b"not hdf5")
    assert not is_patch_file(tmp_path / "garbage.h5")  # `pcam drift` names it as a PCAM file
    with h5py.File(tmp_path / "flat.h5", "w") as handle:
        handle["coords"] = np.zeros(3, np.int64)
    with h5py.File(tmp_path / "empty.h5", "w") as handle:
        handle["coords"] = np.zeros((0, 2), np.int64)
        handle["coords"].attrs["patch_size"] = 96
    assert is_patch_file(tmp_path / "flat.h5")
    with pytest.raises(PipelineError, match=r"flat\.h5: key coords holds int64 \(3,\).*Fix"):
        patch_grid(tmp_path / "flat.h5")
    with pytest.raises(PipelineError, match=r"empty\.h5: key coords holds no patches"):
        patch_grid(tmp_path / "empty.h5")
