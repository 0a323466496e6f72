"""The paths the code writes and the paths dvc.yaml declares are the same paths, and each
stage depends on exactly the project code it runs."""

import ast
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pcam_pipeline import paths
from pcam_pipeline.data.pcam import checksums_from
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
        "export": {paths.EXPORT_DIR, paths.EXPORT_REPORT},
        "export_bench": {paths.EXPORT_BENCH_FILE},
        "benchmark": {paths.BENCHMARK_DIR, paths.BENCHMARK_FILE},
        "drift_reference": {paths.DRIFT_DIR},
    }
    declared = declared_outputs()
    assert list(declared) == [
        "fetch", "validate", "preprocess", "train", "evaluate", "export", "export_bench",
        "benchmark", "drift_reference",
    ]  # fmt: skip
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

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    published, _ = checksums_from(str(REPO_ROOT / params["fetch"]["checksums"]))
    tree = Tree()
    for name, md5 in published.items():
        tree.add((name,), Meta(), HashInfo("md5", md5))
    tree.digest()
    out = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    assert out["path"] == str(paths.RAW_DIR)
    assert out["md5"] == tree.hash_info.value
    assert out["nfiles"] == len(published) == 6


def code_strings(path: Path) -> set[str]:
    """The string literals of a module's code (not its docstrings); an f-string with `{}` for
    each field: f"{split}.h5" gives "{}.h5"."""
    tree = ast.parse(path.read_text())
    not_literals = {  # docstrings
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in not_literals:
                found.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            parts = node.values
            found.add("".join(str(p.value) if isinstance(p, ast.Constant) else "{}" for p in parts))
            not_literals.update(id(part) for part in parts)  # parts of the f-string above
    return found


def test_the_processed_file_names_are_written_once():
    """data/processed's files are named in data/processed.py alone; everyone else asks it."""
    names = {"stats.json", "train.h5", "valid.h5", "test.h5", "{}.h5"}
    naming = {
        str(path.relative_to(REPO_ROOT))
        for path in (SOURCE_ROOT / PACKAGE).rglob("*.py")
        if names & code_strings(path)
    }
    assert naming == {"src/pcam_pipeline/data/processed.py"}


# --- each stage depends on exactly the project code it runs ------------------------------------

PACKAGE = "pcam_pipeline"
SOURCE_ROOT = REPO_ROOT / "src"
STAGES = (
    "fetch", "validate", "preprocess", "train", "evaluate", "export", "export_bench", "benchmark"
)  # fmt: skip


def module_path(name: str, root: Path = SOURCE_ROOT) -> Path | None:
    """The file of a project module or package (`pcam_pipeline.data.loader`) under `root`, or
    None."""
    base = root.joinpath(*name.split("."))
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


def imported_modules(
    path: Path, name: str, top_level_only: bool, root: Path = SOURCE_ROOT
) -> set[str]:
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
            if target.split(".")[0] != PACKAGE or module_path(target, root) is None:
                continue
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def stage_closure(stage: str, root: Path = SOURCE_ROOT) -> set[str]:
    """Every project file `pcam <stage>` can run, relative to the repository (`root`'s parent):
    the CLI's module-level imports (its other imports serve other commands), then the stage
    module and, transitively, everything it and what it imports import, at module level or
    inside functions."""
    cli = f"{PACKAGE}.cli"
    cli_imports = imported_modules(module_path(cli, root), cli, top_level_only=True, root=root)
    start = {cli, *cli_imports, PACKAGE, f"{PACKAGE}.stages", f"{PACKAGE}.stages.{stage}"}
    seen: set[str] = set()
    todo = sorted(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != cli:
            todo += imported_modules(module_path(name, root), name, False, root) - seen
    return {str(module_path(name, root).relative_to(root.parent)) for name in seen}


def other_stages(stage: str, root: Path = SOURCE_ROOT) -> set[str]:
    """The stage modules besides its own that `pcam <stage>` runs, through any chain."""
    own = {f"src/{PACKAGE}/stages/{stage}.py", f"src/{PACKAGE}/stages/__init__.py"}
    return {
        path
        for path in stage_closure(stage, root) - own
        if path.startswith(f"src/{PACKAGE}/stages/")
    }


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


def test_no_stage_runs_another_through_any_chain():
    for stage in STAGES:
        others = other_stages(stage)
        assert not others, f"pcam {stage} runs {sorted(others)}: move what they share below"


def test_the_clis_other_commands_are_no_part_of_a_stage():
    assert "src/pcam_pipeline/predict.py" not in stage_closure("train")
    assert "src/pcam_pipeline/data/download.py" not in stage_closure("train")
    assert "src/pcam_pipeline/data/download.py" not in stage_closure("fetch")


def test_editing_a_writer_or_the_block_scan_reruns_no_training_or_evaluation():
    for stage in ("train", "evaluate"):
        closure = stage_closure(stage)
        for module in ("hdf5", "writers", "block_scan"):
            assert f"src/pcam_pipeline/data/{module}.py" not in closure, (stage, module)


def test_editing_the_checkpoint_format_reruns_no_data_stage():
    for stage in ("fetch", "validate", "preprocess"):
        closure = stage_closure(stage)
        training = sorted(path for path in closure if path.startswith("src/pcam_pipeline/train/"))
        assert not training, (stage, training)


def test_the_top_of_the_package_holds_few_modules_and_nothing_imports_a_stage_upward():
    package = SOURCE_ROOT / PACKAGE
    top = sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 10, top
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if relative.parts[0] == "stages" or relative == Path("cli.py"):
            continue
        assert "pcam_pipeline.stages" not in path.read_text(), relative


def test_the_benchmark_runs_no_validate_or_preprocess_code():
    """Editing a validation rule or the split writer re-runs validate or preprocess (and what
    their outputs feed), never the benchmark."""
    benchmark = stage_closure("benchmark")
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["benchmark"]
    listed = stage["deps"]
    for path in (
        "src/pcam_pipeline/stages/validate.py",
        "src/pcam_pipeline/stages/preprocess.py",
        "src/pcam_pipeline/data/checks.py",
        "src/pcam_pipeline/data/scan.py",
        "src/pcam_pipeline/data/prepare.py",
        "src/pcam_pipeline/perf/full_size.py",
    ):
        assert path not in benchmark and path not in listed, path
    assert {"validate", "preprocess", "fetch.seed"}.isdisjoint(listed_params("benchmark")), (
        "nor their params"
    )


def listed_params(stage: str) -> list[str]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_closure_finds_a_stage_reached_through_other_modules(tmp_path):
    """The chain that once made editing a validation rule re-run the benchmark: benchmark
    imports perf inside a function, perf imports the validate stage. Imports for type hints
    only (under TYPE_CHECKING) never run and are not followed."""
    root = write_tree(
        tmp_path / "src",
        {
            "__init__.py": "",
            "cli.py": "from pcam_pipeline import paths\n",
            "paths.py": "",
            "perf.py": "from pcam_pipeline.stages.validate import validate_dir\n",
            "hints.py": "",
            "stages/__init__.py": "",
            "stages/validate.py": "def validate_dir():\n    pass\n",
            "stages/train.py": (
                "from typing import TYPE_CHECKING\n\n"
                "if TYPE_CHECKING:\n    from pcam_pipeline import hints\n"
                "    from pcam_pipeline.stages import validate\n"
            ),
            "stages/benchmark.py": "def run():\n    from pcam_pipeline import perf\n",
        },
    )
    assert other_stages("benchmark", root) == {"src/pcam_pipeline/stages/validate.py"}
    assert "src/pcam_pipeline/perf.py" in stage_closure("benchmark", root)
    assert "src/pcam_pipeline/paths.py" in stage_closure("validate", root), "the CLI's imports"
    assert other_stages("train", root) == set()
    assert "src/pcam_pipeline/hints.py" not in stage_closure("train", root)
