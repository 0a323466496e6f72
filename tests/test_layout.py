"""The paths the code writes and the paths dvc.yaml declares are the same paths, and each
stage depends on exactly the project code it runs."""

import ast
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# --- each stage depends on exactly the project code it runs ------------------------------------

PACKAGE = "pcam_pipeline"
SOURCE_ROOT = REPO_ROOT / "src"


def module_path(name: str) -> Path | None:
    """The file of a project module or package (`pcam_pipeline.data.loader`), or None."""
    base = SOURCE_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def running_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:`: imports for type hints only,
    which never run."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
            "TYPE_CHECKING"
        ):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def imported_modules(path: Path, name: str, top_level_only: bool) -> set[str]:
    """Project modules that the file at `path` runs an import of (anywhere in it, or only at
    module level), with the packages each import executes on the way."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(running_nodes(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module; `from module import name` not.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != PACKAGE or module_path(target) is None:
                continue
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def stage_closure(stage: str) -> set[str]:
    """Every project file `pcam <stage>` can run: the CLI's module-level imports (its other
    imports serve other commands), then the stage module and, transitively, everything it and
    what it imports import, at module level or inside functions."""
    cli = f"{PACKAGE}.cli"
    start = {cli, *imported_modules(module_path(cli), cli, top_level_only=True)}
    start |= {PACKAGE, f"{PACKAGE}.stages", f"{PACKAGE}.stages.{stage}"}
    seen: set[str] = set()
    todo = sorted(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != cli:
            todo += imported_modules(module_path(name), name, top_level_only=False) - seen
    return {str(module_path(name).relative_to(REPO_ROOT)) for name in seen}


def dependency_drift(stages: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """For each stage whose code deps in dvc.yaml are not its import closure: what is missing
    and what is listed but never imported."""
    drift = {}
    for name, stage in stages.items():
        listed = {dep for dep in stage["deps"] if dep.startswith("src/")}
        expected = stage_closure(name)
        if listed != expected:
            drift[name] = {
                "missing": sorted(expected - listed),
                "not_imported": sorted(listed - expected),
            }
    return drift


def test_each_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    drift = dependency_drift(stages)
    expected = {
        name: "\n".join(f"      - {path}" for path in sorted(stage_closure(name))) for name in drift
    }
    assert not drift, f"dvc.yaml deps differ from the stages' imports: {drift}\n" + "\n".join(
        f"{name}:\n{lines}" for name, lines in expected.items()
    )


def test_the_closure_check_catches_a_removed_dep_and_an_extra_one():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    broken = copy.deepcopy(stages)
    broken["preprocess"]["deps"].remove("src/pcam_pipeline/data/pcam.py")
    broken["evaluate"]["deps"].append("src/pcam_pipeline/stages/train.py")
    drift = dependency_drift(broken)
    assert drift["preprocess"] == {
        "missing": ["src/pcam_pipeline/data/pcam.py"],
        "not_imported": [],
    }
    assert drift["evaluate"]["not_imported"] == ["src/pcam_pipeline/stages/train.py"]
    assert set(drift) == {"preprocess", "evaluate"}


def test_the_closure_follows_imports_inside_functions_and_packages():
    benchmark = stage_closure("benchmark")
    # benchmark.full runs perf, imported inside a function
    assert "src/pcam_pipeline/perf.py" in benchmark
    assert "src/pcam_pipeline/data/__init__.py" in benchmark
    # the CLI's other commands are not part of a stage
    assert "src/pcam_pipeline/predict.py" not in stage_closure("train")


def test_stages_never_import_each_other_directly():
    for path in sorted((SOURCE_ROOT / PACKAGE / "stages").glob("*.py")):
        name = f"{PACKAGE}.stages.{path.stem}"
        others = {
            module
            for module in imported_modules(path, name, top_level_only=False)
            if module.startswith(f"{PACKAGE}.stages.") and module != name
        }
        assert not others, f"{path.name} imports {others}: move what they share below the stages"
