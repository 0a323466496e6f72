"""scripts/pr-comment.sh (`make pr-comment`): one report comment per pull request, edited on
later pushes.

`gh` is replaced by tests/integration/bin/gh-standin on PATH (a recording stand-in for the three
`gh api` calls the script makes, with GitHub's paging): the real gh cannot be pointed at a fake
REST server on loopback over plain HTTP. What this checks is the script's find-or-create logic,
its paging and its body; not GitHub's API itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

STANDIN = Path(__file__).resolve().parent / "bin" / "gh-standin"
MARKER = "<!-- pcam-report -->"
BOT = "github-actions[bot]"


@pytest.fixture
def github(tmp_path: Path) -> Path:
    """A PATH directory whose `gh` is the stand-in, and a pull request with two human comments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gh").symlink_to(STANDIN)
    human = [
        {"id": 1, "body": "looks good", "user": {"login": "someone"}},
        {"id": 2, "body": f"{MARKER}\nquoting the bot", "user": {"login": "someone"}},
    ]
    (tmp_path / "state.json").write_text(json.dumps({"comments": human, "calls": []}))
    return tmp_path


def post(
    github: Path, report_text: str, target: str = "pr-comment", **extra: str
) -> subprocess.CompletedProcess[str]:
    """`make TARGET` with the report file holding `report_text`."""
    report = github / "report.md"
    report.write_text(report_text)
    files = [f"PCAM_REPORT_FILE={report}", f"PCAM_DATA_REPORT_FILE={report}"]
    env = {
        **os.environ,
        "PATH": f"{github / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "GH_STANDIN_STATE": str(github / "state.json"),
        "GH_TOKEN": "token",
        "GITHUB_REPOSITORY": "some-lab/pcam-pipeline",
        "PCAM_PR_NUMBER": "7",
        **extra,
    }
    return subprocess.run(
        ["make", "--no-print-directory", "-s", target, *files],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def comments(github: Path) -> list[dict]:
    return json.loads((github / "state.json").read_text())["comments"]


def test_the_first_push_creates_the_comment_and_later_pushes_edit_it(github: Path):
    first = post(
        github, "# report one\n\n![Loss](images/loss.png)\n", PCAM_REPORT_URL="https://x/1"
    )
    assert first.returncode == 0, first.stderr
    assert "created" in first.stderr
    mine = [c for c in comments(github) if c["user"]["login"] == BOT]
    assert len(mine) == 1
    assert mine[0]["body"].startswith(f"{MARKER}\n# report one\n")
    assert "*(plot: Loss)*" in mine[0]["body"] and "images/loss.png" not in mine[0]["body"]
    assert "https://x/1" in mine[0]["body"]

    # The bot's comment is now on the second page (two comments a page): found by paging.
    second = post(github, "# report two\n")
    assert second.returncode == 0, second.stderr
    assert f"updated comment {mine[0]['id']}" in second.stderr
    after = comments(github)
    assert [c["id"] for c in after] == [1, 2, mine[0]["id"]]
    assert after[2]["body"] == f"{MARKER}\n# report two\n"
    assert after[1]["body"] == f"{MARKER}\nquoting the bot", "a human's comment is never edited"


def test_without_a_pull_request_number_it_says_so(github: Path):
    result = post(github, "# r\n", PCAM_PR_NUMBER="")
    assert result.returncode != 0 and "PCAM_PR_NUMBER" in result.stderr
    assert json.loads((github / "state.json").read_text())["calls"] == []


def test_the_data_report_is_a_comment_of_its_own_edited_on_later_pushes(github: Path):
    assert post(github, "# metrics report\n").returncode == 0
    first = post(github, "# data one\n", target="data-comment")
    assert first.returncode == 0, first.stderr
    second = post(github, "# data two\n", target="data-comment")
    assert second.returncode == 0 and "updated comment" in second.stderr
    bodies = [c["body"] for c in comments(github) if c["user"]["login"] == BOT]
    assert bodies == [f"{MARKER}\n# metrics report\n", "<!-- pcam-data -->\n# data two\n"]


def test_a_marker_that_is_not_an_html_comment_is_refused(github: Path):
    result = post(github, "# r\n", PCAM_COMMENT_MARKER="pcam-data")
    assert result.returncode != 0 and "PCAM_COMMENT_MARKER 'pcam-data'" in result.stderr
