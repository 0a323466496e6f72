"""The paths the code writes and the paths dvc.yaml declares are the same paths."""

import yaml

from pcam_pipeline import paths
from pcam_pipeline.data.pcam import PUBLISHED_H5_MD5
from tests.conftest import REPO_ROOT


def declared_outputs() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    declared = {}
    for name, stage in stages.items():
        entries = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
        declared[name] = {next(iter(e)) if isinstance(e, dict) else e for e in entries}
    return declared


def test_every_stage_output_in_dvc_yaml_is_a_path_constant():
    expected = {
        "fetch": {paths.PCAM_DIR},
        "validate": {paths.VALIDATE_REPORT},
        "preprocess": {paths.PROCESSED_DIR, paths.PREPROCESS_REPORT},
        "train": {
            paths.LAST_CHECKPOINT,
            paths.BEST_CHECKPOINT,
            paths.TRAIN_LIVE_DIR / "plots",
            paths.TRAIN_LIVE_DIR / "metrics.json",
        },
        "evaluate": {paths.EVALUATE_DIR, paths.METRICS_FILE},
        "benchmark": {paths.BENCHMARK_DIR, paths.BENCHMARK_FILE},
    }
    declared = declared_outputs()
    assert list(declared) == ["fetch", "validate", "preprocess", "train", "evaluate", "benchmark"]
    for stage, outs in expected.items():
        assert declared[stage] == {str(p) for p in outs}, stage


def test_each_stage_depends_on_its_own_code():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert f"src/pcam_pipeline/stages/{name}.py" in stage["deps"], name
        assert stage["cmd"] == f"pcam {name}"


def test_data_dvc_pins_the_published_md5s():
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for name, md5 in PUBLISHED_H5_MD5.items():
        tree.add((name,), Meta(), HashInfo("md5", md5))
    tree.digest()
    out = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    assert out["path"] == str(paths.RAW_DIR)
    assert out["md5"] == tree.hash_info.value
    assert out["nfiles"] == len(PUBLISHED_H5_MD5) == 6
