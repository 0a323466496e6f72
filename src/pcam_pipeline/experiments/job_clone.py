"""A job's own clone of the repository it was submitted from, sharing that repository's DVC
cache, and the experiment made there pushed back: the one implementation behind slurm/lib.sh
(repro, sweep, benchmark and serve jobs call `python -m pcam_pipeline.experiments.job_clone
clone|push`) and `pcam search`'s workers.

Why a clone: several `dvc exp run` in one workspace contend for its lock, and a job must never
lock the checkout its user keeps working in. Its DVC cache is the submitting repository's, so
stages already run are restored rather than recomputed and an experiment's outputs need not be
copied back: the push sends its git ref only (`--no-cache`).

The rule for a reused clone: a clone already at the job's commit (an earlier attempt of the same
job, requeued; a restarted search worker) is kept as it stands. The params its first attempt set
and the checkpoint it saved (models/last.pt) are what the rerun resumes from; the tracked files
that differ from the commit are named in the log. A clone at any other commit is removed and
made again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.experiments.dvc import command

WORK_ROOT_ENV = "PCAM_WORK_ROOT"  # where jobs make their clones; must be visible from every node
IDENTITY_KEYS = ("user.name", "user.email")
PUSH_ATTEMPTS = 3
PUSH_BACKOFF_S = 5.0  # attempt N waits N times this: a busy file server, a lock held briefly


@dataclass(frozen=True)
class JobClone:
    path: Path
    reused: bool  # an earlier attempt's clone, kept as it stands


def log(message: str) -> None:
    # stderr: the CLI's stdout is the answer slurm/lib.sh reads
    print(f"[job clone] {message}", file=sys.stderr, flush=True)


def work_root(submit: Path) -> Path:
    """Where the clones of jobs submitted from `submit` go: $PCAM_WORK_ROOT, else
    <submit>/.pcam-work."""
    root = os.environ.get(WORK_ROOT_ENV)
    return Path(root).absolute() if root else submit / ".pcam-work"


def resolve_commit(submit: Path, commit: str | None) -> str:
    """`commit` (default: HEAD) as the full hash of a commit `submit` has."""
    rev = f"{commit or 'HEAD'}^{{commit}}"
    fix = f"commit {commit} is not in {submit}: commit your changes before submitting"
    return command(["git", "rev-parse", "--verify", "--quiet", rev], submit, fix).strip()


def clone_head(work: Path) -> str | None:
    """The commit a clone is at, or None when `work` is no usable clone."""
    if not (work / ".git").exists():
        return None
    try:
        return command(["git", "rev-parse", "HEAD"], work).strip()
    except PipelineError:
        return None


def copy_identity(submit: Path, work: Path) -> None:
    """The git identity `submit` resolves (its own, or the user's global one) into `work`'s own
    config: a node or container with another HOME lacks the global one, and `dvc exp save`
    commits."""
    for key in IDENTITY_KEYS:
        try:
            value = command(["git", "config", key], submit).strip()
        except PipelineError:
            continue  # unset; submit.sh refuses to submit an experiment job without it
        command(["git", "config", key, value], work)


def make_or_reuse(submit: Path, work: Path, commit: str | None = None) -> JobClone:
    """A clone of `submit` at `commit` (default: its HEAD) in `work`, sharing `submit`'s DVC
    cache; an earlier attempt's clone at that commit is reused as it stands (the module's rule)."""
    submit = submit.resolve()
    head = resolve_commit(submit, commit)
    if clone_head(work) == head:
        edited = command(["git", "status", "--porcelain", "--untracked-files=no"], work)
        files = [line[3:] for line in edited.splitlines() if line.strip()]
        kept = f"kept as it stands, edits included: {', '.join(files)}" if files else "unedited"
        log(f"reusing {work} (an earlier attempt of this job, at {head[:12]}): {kept}")
        return JobClone(work, reused=True)
    # The git part is made under a temporary name: an attempt killed half-way leaves no
    # directory that a rerun would take for a finished clone.
    partial = work.with_name(f".{work.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    dubious = f"if git says 'dubious ownership': git config --global --add safe.directory {submit}"
    command(
        ["git", "clone", "--quiet", "--no-checkout", str(submit), str(partial)], submit, dubious
    )
    checkout = ["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", head]
    command(checkout, partial)
    copy_identity(submit, partial)
    local_config = submit / ".dvc" / "config.local"  # cache.type/shared, remotes, site_cache_dir
    if local_config.exists():
        shutil.copy2(local_config, partial / ".dvc" / "config.local")
    cache = command(["dvc", "cache", "dir"], submit).strip().splitlines()[-1]
    command(["dvc", "cache", "dir", "--local", cache], partial)
    if work.exists():
        log(f"removing {work}: not a clone at {head[:12]}")
        shutil.rmtree(work)
    partial.rename(work)
    # After the rename: DVC's state keys its hashes by path. The commit's outputs that are in the
    # shared cache make the stages the job does not change up to date (the run-cache alone cannot
    # restore stages with uncached outputs); those missing are made by the stages that make them.
    try:
        command(["dvc", "checkout", "--allow-missing", "--quiet"], work)
    except PipelineError as exc:
        log(
            f"note: some outputs of {head[:12]} are not in the cache; their stages will run ({exc})"
        )
    log(f"cloned {submit} at {head[:12]} into {work} (DVC cache {cache})")
    return JobClone(work, reused=False)


def push(
    work: Path,
    name: str,
    with_cache: bool = False,
    attempts: int = PUSH_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """`dvc exp push origin NAME` from `work` to the repository it was cloned from, tried
    `attempts` times with a growing pause; then an error naming where the experiment is kept.
    `with_cache` also pushes its outputs to the default DVC remote."""
    origin = command(["git", "remote", "get-url", "origin"], work).strip()
    args = ["dvc", "exp", "push", *([] if with_cache else ["--no-cache"]), "origin", name]
    for attempt in range(1, attempts + 1):
        try:
            command(args, work)
        except PipelineError as exc:
            if attempt == attempts:
                raise PipelineError(
                    f"could not push experiment '{name}' to {origin} ({attempts} attempts); it is "
                    f"kept in {work}: once {origin} takes it, push it from there with "
                    f"`dvc exp push origin {name}`. The last attempt said:\n{exc}"
                ) from exc
            pause = PUSH_BACKOFF_S * attempt
            log(
                f"pushing '{name}' failed (attempt {attempt} of {attempts}); again in {pause:.0f} s"
            )
            sleep(pause)
        else:
            log(
                f"pushed experiment '{name}' to {origin}: `dvc exp show` there lists it; "
                f"`dvc exp branch {name} {name} && git merge {name} && dvc checkout "
                "--allow-missing` brings its results into the workspace"
            )
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcam_pipeline.experiments.job_clone")
    sub = parser.add_subparsers(dest="action", required=True)
    clone = sub.add_parser("clone", help="make or reuse <work root>/NAME; prints 'new|reused PATH'")
    clone.add_argument("submit", type=Path, help="the repository the job was submitted from")
    clone.add_argument("name", help="the clone's directory name under the work root")
    clone.add_argument("--commit", help="the commit to run (default: the repository's HEAD)")
    sent = sub.add_parser("push", help="push experiment NAME from the clone WORK to its origin")
    sent.add_argument("work", type=Path)
    sent.add_argument("name")
    sent.add_argument("--with-cache", action="store_true", help="also push its outputs")
    args = parser.parse_args(argv)
    try:
        if args.action == "clone":
            submit = args.submit.resolve()
            made = make_or_reuse(submit, work_root(submit) / args.name, args.commit)
            print(f"{'reused' if made.reused else 'new'} {made.path}")
        else:
            push(args.work, args.name, args.with_cache)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
