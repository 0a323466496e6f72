"""A job's clone and its push back, on a real git repository with a real `dvc` (a one-stage
project, seconds): the identity copied, a reused clone kept as it stands, the push retried."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments import job_clone
from pcam_pipeline.experiments.dvc import run

BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


def submit_repo(directory: Path) -> Path:
    """A committed one-stage DVC project with its identity in its own git config only."""
    directory.mkdir()
    sh(directory, "git", "init", "-q", "-b", "main")
    sh(directory, "git", "config", "user.name", "Submit Tester")
    sh(directory, "git", "config", "user.email", "submit@example.org")
    dvc = str(BIN / "dvc")
    sh(directory, dvc, "init", "-q")
    sh(directory, dvc, "config", "core.site_cache_dir", str(directory.parent / "site"))
    (directory / "a.txt").write_text("a\n")
    sh(directory, dvc, "stage", "add", "-q", "-n", "copy", "-d", "a.txt", "-o", "b.txt",
       "cp a.txt b.txt")  # fmt: skip
    sh(directory, dvc, "repro", "-q")
    sh(directory, "git", "add", "-A")
    sh(directory, "git", "commit", "-q", "-m", "one stage")
    return directory


@pytest.fixture
def no_global_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a node whose HOME differs from the submitting one's: no global identity."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("PATH", f"{BIN}:/usr/bin:/bin")


@pytest.mark.usefixtures("no_global_git")
def test_a_job_clone_is_made_reused_as_it_stands_and_pushed_with_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    submit = submit_repo(tmp_path / "submit")
    monkeypatch.setenv(job_clone.WORK_ROOT_ENV, str(tmp_path / "work"))
    assert job_clone.main(["clone", str(submit), "job-1"]) == 0
    work = tmp_path / "work" / "job-1"
    assert capsys.readouterr().out == f"new {work}\n"
    # The submitting repository's identity, in the clone's own config; outputs from its cache.
    assert sh(work, "git", "config", "--local", "user.name").strip() == "Submit Tester"
    assert (work / "b.txt").read_text() == "a\n"
    assert not list(tmp_path.glob("work/.*partial")), "the partial clone was renamed"

    # A requeued attempt: the clone is kept as it stands, its edits named in the log.
    (work / "a.txt").write_text("edited by the first attempt\n")
    assert job_clone.main(["clone", str(submit), "job-1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"reused {work}\n"
    assert "kept as it stands, edits included: a.txt" in captured.err
    assert (work / "a.txt").read_text() == "edited by the first attempt\n"

    # The experiment (a commit: it needs the copied identity) pushed back; the first attempt
    # fails (origin unreachable), the retry after the pause goes through.
    run(["dvc", "exp", "save", "-q", "-n", "exp-1"], work)
    sh(work, "git", "remote", "set-url", "origin", str(tmp_path / "moved"))
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        sh(work, "git", "remote", "set-url", "origin", str(submit))  # the file server is back

    job_clone.push(work, "exp-1", sleep=pause)
    assert pauses == [job_clone.PUSH_BACKOFF_S]
    refs = sh(submit, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    assert [r.rsplit("/", 1)[-1] for r in refs] == ["exp-1"]

    # Every attempt refused: the error says where the experiment is kept and how to push it.
    sh(work, "git", "remote", "set-url", "origin", str(tmp_path / "moved"))
    monkeypatch.setattr(job_clone, "PUSH_BACKOFF_S", 0.0)
    assert job_clone.main(["push", str(work), "exp-1"]) == 1
    error = capsys.readouterr().err
    assert f"(3 attempts); it is kept in {work}" in error
    assert "push it from there with `dvc exp push origin exp-1`" in error
    assert "failed with exit code" in error  # the last attempt's own message follows

    # A new commit submitted: the old clone is not reused but made again, edits gone.
    (submit / "a.txt").write_text("b\n")
    sh(submit, "git", "commit", "-q", "-am", "second")  # b.txt stale: the job's stage would run
    made = job_clone.make_or_reuse(submit, work)
    assert not made.reused and (work / "a.txt").read_text() == "b\n"
    assert "removing" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="commit your changes before submitting"):
        job_clone.make_or_reuse(submit, work, "0" * 40)


def test_a_failed_command_names_itself_its_exit_code_and_stderr_tail(tmp_path: Path):
    with pytest.raises(PipelineError) as failed:
        run(["git", "rev-parse", "--verify", "no-such-rev"], tmp_path, "fix: name a commit")
    text = str(failed.value)
    assert text.startswith(f"{tmp_path}: `git rev-parse --verify no-such-rev` failed with exit")
    assert text.endswith("fix: name a commit") and "fatal:" in text
    with pytest.raises(PipelineError, match="`no-such-tool-pcam` is not on PATH"):
        run(["no-such-tool-pcam"], tmp_path)
