"""`pcam model-get TAG`: a registered model version, fetched and checked, as the registry
workflow (.github/workflows/registry.yml) and a user who deploys it need it.

TAG is a GTO tag of the model artifact: a version (`pcam-classifier@v1.2.0`) or a stage
assignment (`pcam-classifier#prod#3`, which names the version tagged on the same commit). The
checkpoint comes through `dvc artifacts get` and the export directory (ONNX, card, Triton
repository: what `pcam serve` and the serving image need) through `dvc get`, both at the tag's
commit, from the DVC remote that commit configures; each is checked against the md5 the tag's
commit's dvc.lock records, and nothing is left in OUT unless both match."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from packaging.version import Version

from pcam_pipeline.errors import PipelineError
from pcam_pipeline.paths import BEST_CHECKPOINT, EXPORT_DIR
from pcam_pipeline.repro import md5_file

VERSION_TAG = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)@(?P<version>v\d+\.\d+\.\d+\S*)$")
STAGE_TAG = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)#(?P<stage>[a-z0-9-]+)#\d+$")
ARTIFACT = "pcam-classifier"
RECORD = "registry.json"

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def run(command: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class Release:
    tag: str
    artifact: str
    version: str
    stage: str | None
    commit: str


def checked(result: subprocess.CompletedProcess, fix: str) -> str:
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise PipelineError(f"`{' '.join(result.args)}` failed: {said[-1] if said else ''}; {fix}")
    return result.stdout


def resolve(tag: str, runner: Runner = run) -> Release:
    """The artifact, version, stage and commit a GTO tag names."""
    version_match, stage_match = VERSION_TAG.match(tag), STAGE_TAG.match(tag)
    match = version_match or stage_match
    if match is None or match["name"] != ARTIFACT:
        raise PipelineError(
            f"tag {tag!r}: not a GTO tag of {ARTIFACT}; give {ARTIFACT}@vX.Y.Z (a version) or "
            f"{ARTIFACT}#STAGE#N (a stage assignment), as `gto register`/`gto assign` write them"
        )
    commit = checked(
        runner(["git", "rev-list", "-n", "1", f"refs/tags/{tag}"]),
        "fetch the tags (git fetch --tags) or check the name (git tag --list)",
    ).strip()
    if version_match:
        return Release(tag, ARTIFACT, version_match["version"], None, commit)
    on_commit = checked(runner(["git", "tag", "--points-at", commit]), "check the repository")
    versions = [
        m["version"]
        for name in on_commit.split()
        if (m := VERSION_TAG.match(name)) and m["name"] == ARTIFACT
    ]
    if not versions:
        raise PipelineError(
            f"tag {tag!r}: no {ARTIFACT}@v* version tag on its commit {commit[:12]}; "
            "assign a stage to a registered version (gto assign ... --version vX.Y.Z)"
        )
    newest = max(versions, key=lambda v: Version(v.removeprefix("v")))
    return Release(tag, ARTIFACT, newest, stage_match["stage"], commit)  # type: ignore[index]


def locked_md5s(commit: str, runner: Runner = run) -> dict[str, str]:
    """path -> md5 of the stage outputs in dvc.lock as committed at `commit`."""
    text = checked(
        runner(["git", "show", f"{commit}:dvc.lock"]), "the tag's commit has no dvc.lock"
    )
    stages = (yaml.safe_load(text) or {}).get("stages", {})
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", []) if "md5" in o}


def md5_dir(root: Path) -> str:
    """The directory's md5 as DVC writes it in dvc.lock (`<md5 of its file list>.dir`)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = path.relative_to(root).parts
        tree.add(key, Meta(size=path.stat().st_size), HashInfo("md5", md5_file(path)))
    tree.digest()
    return tree.hash_info.value  # type: ignore[return-value]


def fetch(release: Release, out: Path, runner: Runner = run) -> dict[str, str]:
    """OUT/best.pt, OUT/export/ and OUT/registry.json for the release, each checked against the
    tag's commit's dvc.lock; OUT is replaced only when everything matches."""
    locked = locked_md5s(release.commit, runner)
    missing = [str(p) for p in (BEST_CHECKPOINT, EXPORT_DIR) if str(p) not in locked]
    if missing:
        raise PipelineError(f"dvc.lock at {release.commit[:12]}: no md5 for {', '.join(missing)}")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    remote_fix = "check the DVC remote and its credentials (dvc remote list; docs/remote.md)"
    checked(
        runner(["dvc", "artifacts", "get", ".", release.artifact, "--rev", release.version,
                "-o", str(staging / "best.pt")]),
        remote_fix,
    )  # fmt: skip
    checked(
        runner(["dvc", "get", ".", str(EXPORT_DIR), "--rev", release.commit,
                "-o", str(staging / "export")]),
        remote_fix,
    )  # fmt: skip
    found = {
        str(BEST_CHECKPOINT): md5_file(staging / "best.pt"),
        str(EXPORT_DIR): md5_dir(staging / "export"),
    }
    for path, md5 in found.items():
        if md5 != locked[path]:
            shutil.rmtree(staging)
            raise PipelineError(
                f"{path} fetched for {release.tag}: md5 {md5}, but dvc.lock at "
                f"{release.commit[:12]} records {locked[path]}: the remote holds other bytes "
                "than the ones registered; do not deploy it (dvc push from the machine that "
                "trained it, then run this again)"
            )
    record = {
        "tag": release.tag,
        "artifact": release.artifact,
        "version": release.version,
        "stage": release.stage,
        "commit": release.commit,
        "md5": found,
    }
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return found


def main(tag: str, out: Path) -> None:
    release = resolve(tag)
    found = fetch(release, out)
    print(f"{release.tag}: version {release.version} at {release.commit[:12]} -> {out}")
    for path, md5 in found.items():
        print(f"  {path}: {md5} (as dvc.lock records)")
