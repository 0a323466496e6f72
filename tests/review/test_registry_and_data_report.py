"""The pure parts of `pcam model-get` and `pcam data-report`, with git and dvc answered by test
doubles (the integration tests run both against real git, DVC and GTO)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export import registry
from pcam_pipeline.review import data_report

COMMIT = "ab" * 20


def answers(table: dict[tuple[str, ...], tuple[int, str]]):
    """A runner answering each command (by its leading words) from `table`."""

    def runner(command):
        for prefix, (code, out) in table.items():
            if tuple(command[: len(prefix)]) == prefix:
                return subprocess.CompletedProcess(list(command), code, out, "fatal: no such ref")
        raise AssertionError(f"unexpected command {command}")

    return runner


def test_a_version_tag_names_its_version_and_commit():
    runner = answers({("git", "rev-list"): (0, COMMIT + "\n")})
    release = registry.resolve("pcam-classifier@v1.2.0", runner)
    assert (release.version, release.stage, release.commit) == ("v1.2.0", None, COMMIT)


def test_a_stage_tag_names_the_newest_version_on_its_commit():
    tags = "pcam-classifier@v1.9.0\npcam-classifier@v1.10.0\nother@v9.0.0\npcam-classifier#prod#2\n"
    runner = answers({("git", "rev-list"): (0, COMMIT), ("git", "tag"): (0, tags)})
    release = registry.resolve("pcam-classifier#prod#2", runner)
    assert (release.version, release.stage) == ("v1.10.0", "prod")
    lonely = answers({("git", "rev-list"): (0, COMMIT), ("git", "tag"): (0, "x@v1.0.0\n")})
    with pytest.raises(PipelineError, match="no pcam-classifier@v\\* version tag on its commit"):
        registry.resolve("pcam-classifier#prod#2", lonely)


@pytest.mark.parametrize(
    "tag", ["v1.2.0", "resnet@v1.0.0", "pcam-classifier@1.0", "pcam-classifier#prod"]
)
def test_other_tags_are_refused_with_the_forms_allowed(tag):
    with pytest.raises(
        PipelineError, match=r"give pcam-classifier@vX\.Y\.Z .* or pcam-classifier#STAGE#N"
    ):
        registry.resolve(tag, answers({}))


def test_an_unknown_tag_names_the_fix():
    with pytest.raises(PipelineError, match="git fetch --tags"):
        registry.resolve("pcam-classifier@v9.9.9", answers({("git", "rev-list"): (128, "")}))


def test_the_directory_md5_is_dvcs(tmp_path):
    """The .dir md5 of a directory as `dvc add` itself records it, recomputed from the files."""
    import sys

    tree = tmp_path / "repo" / "export"
    (tree / "repository" / "pcam" / "1").mkdir(parents=True)
    (tree / "model.onnx").write_bytes(bytes(range(256)) * 10)
    (tree / "model_card.json").write_text('{"a": 1}\n')
    (tree / "repository" / "pcam" / "1" / "model.onnx").write_bytes(b"\0" * 100)
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tree.parent, env=env, check=True)
    subprocess.run([*dvc, "add", "-q", "export"], cwd=tree.parent, env=env, check=True)
    recorded = yaml.safe_load((tree.parent / "export.dvc").read_text())["outs"][0]["md5"]
    assert registry.md5_dir(tree) == recorded and recorded.endswith(".dir")


def test_locked_md5s_reads_the_commits_dvc_lock():
    lock = {"stages": {"train": {"outs": [{"path": "models/best.pt", "md5": "1" * 32}]}}}
    runner = answers({("git", "show"): (0, yaml.safe_dump(lock))})
    assert registry.locked_md5s(COMMIT, runner) == {"models/best.pt": "1" * 32}


def test_the_data_report_sets_the_workspace_beside_the_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = {s: {"n": 10, "positive_fraction": 0.5} for s in ("train", "valid", "test")}
    validate = {"ok": True, "errors": 0, "problems": [], "splits": splits}
    preprocess = {s: {"n_in": 10, "n_out": 9} for s in ("train", "valid", "test")}
    base_validate = json.loads(json.dumps(validate))
    base_validate["splits"]["train"]["n"] = 20
    Path("reports").mkdir()
    Path("reports/validate.json").write_text(json.dumps(validate))
    Path("reports/preprocess.json").write_text(json.dumps(preprocess))
    shown = {"reports/validate.json": json.dumps(base_validate)}

    def git(args):
        if args[0] == "show":
            path = args[1].split(":", 1)[1]
            return subprocess.CompletedProcess(
                args, 0 if path in shown else 128, shown.get(path, ""), ""
            )
        if args[:2] == ["diff", "--name-only"]:
            return subprocess.CompletedProcess(args, 0, "data.dvc\n", "")
        return subprocess.CompletedProcess(args, 0, COMMIT, "")

    params = {
        "params.yaml": {
            "fetch.sizes.train": {"old": 20, "new": 10},
            "train.lr": {"old": 1, "new": 2},
        }
    }
    report = data_report.build_data_report(
        "main", tmp_path / "out", dvc=lambda _: json.dumps(params), git=git
    ).read_text()
    assert "Pinned data files changed: `data.dvc`." in report
    assert "| fetch.sizes.train | 20 | 10 |" in report and "train.lr" not in report
    assert "| train.n | 20 | **10** |" in report and "| valid.n | 10 | 10 |" in report
    assert "| train.n_out | - | **9** |" in report  # the base had no preprocess report


def test_the_data_report_needs_the_workspaces_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="run `dvc repro preprocess` first"):
        data_report.build_data_report("main", tmp_path, dvc=lambda _: "{}")
