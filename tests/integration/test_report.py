"""`pcam report BASE` in a temporary repository with two commits, without a network.

The repository holds the project's tracked files (the committed metrics and plot data of the
embedded default); the second commit changes a param, two test metrics and the ROC data, as a
retrained model would. The report runs in a network namespace of its own (`unshare -n`: only a
loopback that is down), so a renderer that fetched Vega from a CDN would fail here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import copy_project, require_integration, run

pytestmark = pytest.mark.heavy

GIT = ["git", "-c", "user.name=pcam-tests", "-c", "user.email=tests@pcam.invalid"]
IMAGE_LINK = re.compile(r"!\[(?P<title>[^\]]+)\]\((?P<file>[^)]+)\)")


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("report") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics_file = repo / "reports" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["test"]["auroc"] = round(metrics["test"]["auroc"] - 0.01, 6)
    metrics["test"]["accuracy"] = round(metrics["test"]["accuracy"] + 0.01, 6)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    roc_file = repo / "reports" / "evaluate" / "plots" / "sklearn" / "roc.json"
    roc = json.loads(roc_file.read_text())
    roc["roc"] = roc["roc"][::2]
    roc_file.write_text(json.dumps(roc))
    run([*GIT, "commit", "-q", "-am", "a retrained model"], repo)
    return repo


def offline(*command: str) -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        require_integration("needs unshare (util-linux) to run the report without a network")
    return [unshare, "--net", "--map-root-user", *command]


def test_report_writes_the_markdown_and_one_image_per_plot_offline(two_commits: Path):
    # `make pr-report` is the pull-request workflow's step: `pcam report $PCAM_REPORT_BASE`
    run(offline("make", "-s", "pr-report", "PCAM_REPORT_BASE=HEAD~1"), two_commits)

    report = (two_commits / "reports" / "compare" / "report.md").read_text()
    metrics_md = run(["dvc", "metrics", "diff", "HEAD~1", "--md"], two_commits).stdout.strip()
    assert f"\n{metrics_md}\n" in report
    assert "test.auroc" in metrics_md and "test.accuracy" in metrics_md
    assert "train.lr" in report
    baseline = report.split("majority-class baseline")[1]
    assert re.search(r"\| auroc \| [0-9.]+ \| [0-9.]+ \| 0\.5 \|", baseline), baseline

    dvc_yaml = yaml.safe_load((two_commits / "dvc.yaml").read_text())
    titles = [next(iter(p)) if isinstance(p, dict) else p for p in dvc_yaml["plots"]]
    links = [(m["title"], m["file"]) for m in IMAGE_LINK.finditer(report)]
    images = two_commits / "reports" / "compare"
    for title in titles:
        files = [file for linked, file in links if linked == title]
        # a Vega plot is drawn once, both revisions in it; an image plot is shown per revision
        assert len(files) == (2 if title.endswith(".png") else 1), (title, files)
        for file in files:
            assert (images / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", file
    assert sorted(p.name for p in (images / "images").iterdir()) == sorted(
        Path(file).name for _, file in links
    )
    status = run(["git", "status", "--porcelain"], two_commits).stdout
    assert status == "", "reports/compare/ is a review artifact: .gitignore should hide it"


def test_a_missing_base_revision_is_named(two_commits: Path):
    result = run(["pcam", "report", "no-such-rev"], two_commits, check=False)
    assert result.returncode == 1
    assert "no-such-rev" in result.stderr and "Traceback" not in result.stderr
