"""scripts/check-no-credentials.py: the pre-commit guard against credentials in tracked files.

Fake keys are assembled at run time so that this file itself stays clean for the guard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

GUARD = REPO_ROOT / "scripts" / "check-no-credentials.py"
KEY_ID = "AKIA" + "Z7TESTKEYNOTREAL"  # 20 characters, the shape of an AWS access key id
TEMP_KEY_ID = "ASIA" + "Z7TESTKEYNOTREAL"
SECRET = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCYzzNOTREALzz"[:27]  # 40 characters


def guard(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GUARD), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def git(*args: str, cwd: Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_fake_secret_has_the_real_shape():
    assert len(KEY_ID) == 20 and len(SECRET) == 40


def test_remote_secrets_in_the_committed_dvc_config_are_refused(tmp_path: Path):
    write(
        tmp_path / ".dvc" / "config",
        "[core]\n    remote = store\n"
        "['remote \"store\"']\n"
        "    url = s3://pcam-dvc/pipeline\n"
        "    endpointurl = https://objectstore.surf.nl\n"
        f"    access_key_id = {KEY_ID}\n"
        f"    secret_access_key = {SECRET}\n",
    )
    result = guard(".dvc/config", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(".dvc/config:6: 'access_key_id' of [remote \"store\"]")
    assert lines[1].startswith(".dvc/config:7: 'secret_access_key' of [remote \"store\"]")
    assert "dvc remote modify --unset store secret_access_key" in lines[1]
    assert "scripts/remote.py credentials store" in lines[1]
    assert SECRET not in result.stderr and KEY_ID not in result.stderr


def test_a_clean_dvc_config_passes(tmp_path: Path):
    write(
        tmp_path / ".dvc" / "config",
        "['remote \"store\"']\n    url = s3://b/p\n    endpointurl = https://x\n"
        "    verify = true\n    profile = pcam\n",
    )
    result = guard(".dvc/config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_tracked_config_local_is_refused(tmp_path: Path):
    write(tmp_path / ".dvc" / "config.local", "[cache]\n    dir = /x\n")
    result = guard(".dvc/config.local", cwd=tmp_path)
    assert result.returncode == 1
    assert "git rm --cached .dvc/config.local" in result.stderr


@pytest.mark.parametrize(
    ("line", "found"),
    [
        (f'key = "{KEY_ID}"', "AWS access key id"),
        (f"export AWS_ACCESS_KEY_ID={TEMP_KEY_ID}", "AWS access key id"),
        (f"aws_secret_access_key = {SECRET}", "aws_secret_access_key is set to a literal"),
        (f'"AWS_SECRET_ACCESS_KEY": "{SECRET}",', "AWS_SECRET_ACCESS_KEY is set to a literal"),
        (f"AWS_SECRET_KEY: {SECRET}", "AWS_SECRET_KEY is set to a literal"),
    ],
)
def test_aws_keys_in_any_text_file_are_refused(tmp_path: Path, line: str, found: str):
    write(tmp_path / "job.sh", f"#!/bin/bash\n\n{line}\n")
    result = guard("job.sh", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"job.sh:3: {found}")
    assert "rotate" in result.stderr


@pytest.mark.parametrize(
    "line",
    [
        'env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}',
        "export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}",
        'aws_secret_access_key = os.environ["AWS_SECRET_ACCESS_KEY"]',
        "aws_secret_access_key = <your secret key>",
        "read -rs AWS_SECRET_ACCESS_KEY && export AWS_SECRET_ACCESS_KEY",
        f"documented example {KEY_ID}  # pragma: allowlist secret",
        "AKIA is the prefix of long-term keys",
    ],
)
def test_references_placeholders_and_allowlisted_lines_pass(tmp_path: Path, line: str):
    write(tmp_path / "notes.md", line + "\n")
    result = guard("notes.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_binary_and_missing_files_are_skipped(tmp_path: Path):
    (tmp_path / "model.pt").write_bytes(b"\0\x01" + KEY_ID.encode() + b"\0" * 100)
    assert guard("model.pt", "deleted.txt", cwd=tmp_path).returncode == 0


def test_without_arguments_every_tracked_file_is_checked(tmp_path: Path):
    git("init", "-q", cwd=tmp_path)
    write(tmp_path / "tracked.py", f"KEY = '{KEY_ID}'\n")
    write(tmp_path / "untracked.py", f"KEY = '{KEY_ID}'\n")
    git("add", "tracked.py", cwd=tmp_path)
    result = guard(cwd=tmp_path)
    assert result.returncode == 1
    assert "tracked.py:1:" in result.stderr
    assert "untracked.py" not in result.stderr


def test_the_project_itself_is_clean():
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = guard(cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


def test_as_a_pre_commit_hook_it_blocks_the_commit(tmp_path: Path):
    pre_commit = shutil.which("pre-commit", path=str(Path(sys.executable).parent))
    if pre_commit is None:
        pytest.skip("pre-commit is not installed in this environment (make setup installs it)")
    git("init", "-q", "-b", "main", cwd=tmp_path)
    write(
        tmp_path / ".pre-commit-config.yaml",
        "repos:\n"
        "  - repo: local\n"
        "    hooks:\n"
        "      - id: check-no-credentials\n"
        "        name: no credentials in tracked files\n"
        f"        entry: {sys.executable} {GUARD}\n"
        "        language: system\n",
    )
    write(tmp_path / ".dvc" / "config", f"['remote \"s\"']\n    secret_access_key = {SECRET}\n")
    git("add", "-A", cwd=tmp_path)
    env = dict(os.environ, PRE_COMMIT_HOME=str(tmp_path / ".pre-commit-home"))
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([pre_commit, "install"], cwd=tmp_path, env=env, check=True, capture_output=True)
    blocked = subprocess.run(
        ["git", "commit", "-m", "oops"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0
    assert ".dvc/config:2: 'secret_access_key'" in blocked.stdout + blocked.stderr
    log = subprocess.run(["git", "log"], cwd=tmp_path, capture_output=True, text=True)
    assert log.returncode != 0, "the commit went through"
