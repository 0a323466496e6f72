"""The data stages under `dvc repro` on a PCAM-sized split: each stage's own time beside DVC's
bookkeeping, and the disk used (`python -m pcam_pipeline.perf repro-full`).

Writes a PCAM-format split (`full_size.write_full_pcam`) as a user's shared copy, times `md5sum`
of its six files (from a cold page cache; the result is fetch.checksums) and `cp` of the train
file, then, for each DVC configuration compared (DVC's defaults, and this repository's
.dvc/config), makes a temporary git + DVC repository holding the project's src/, the fetch,
validate and preprocess stages of its dvc.yaml and params with `fetch.source: path`, and runs
`dvc repro preprocess` with every output line timestamped. A stage's own time runs from DVC's
`> cmd` line to the marker the stage's command prints when it exits; everything else is DVC's
bookkeeping (hashing dependencies and outputs, filling the cache, linking, the lock file).
Disk: the blocks of data/ and .dvc/cache together, each hard-linked file counted once, and
what they add to the shared copy's own blocks. Each repository is removed before the next one
runs; the source at the end.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pcam_pipeline.bench.measure import PCAM_TRAIN_PATCHES, evict
from pcam_pipeline.data.pcam import PATCH_BYTES, all_file_names, split_files
from pcam_pipeline.params import Params
from pcam_pipeline.perf.children import PerfError
from pcam_pipeline.perf.full_size import FULL_DIR, FULL_OTHER_SPLITS, check_disk, write_full_pcam

log = logging.getLogger(__name__)
DATA_STAGES = ("fetch", "validate", "preprocess")
STAGE_DONE = "pcam-perf-stage-done"  # printed by each stage's command when it exits
DEFAULT_CONFIG = "[core]\n    analytics = false\n"  # DVC's defaults (cache.type reflink,copy)
PROJECT_CONFIG = Path(".dvc/config")
# label, the project tree whose src/ runs, its .dvc/config, its params (another tree's code may
# not know this tree's keys: a baseline brings its own params.yaml where it has one)
Variant = tuple[str, Path, str, dict[str, Any]]
# DVC's defaults hold five copies: the source, data/pcam (checked out as a copy of the cache),
# its cache object, data/processed and its cache object
COPIES_NEEDED = 5.1


def source_dir_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def disk_used(*roots: Path) -> int:
    """Bytes of disk blocks under `roots`, each inode once (hard links, the DVC cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                status = os.lstat(os.path.join(folder, name))
                if (status.st_dev, status.st_ino) not in seen:
                    seen.add((status.st_dev, status.st_ino))
                    total += status.st_blocks * 512
    return total


def timed_tool(*command: str) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise PerfError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr}")
    return seconds, result.stdout


def tools_side_by_side(source: Path, work: Path) -> dict[str, Any]:
    """`md5sum` of the six files from a cold page cache (its output becomes fetch.checksums)
    and `cp` of the train file, with the same tools a user would run."""
    files = [source / name for name in all_file_names()]
    cold = all(evict(path) for path in files)
    md5_seconds, sums = timed_tool("md5sum", *(str(path) for path in files))
    checksums = work / "checksums.md5"
    checksums.write_text(
        "".join(f"{line.split()[0]}  {Path(line.split()[1]).name}\n" for line in sums.splitlines())
    )
    train_x = split_files(source, "train")[0]
    os.sync()
    cp_seconds, _ = timed_tool("cp", str(train_x), str(work / "cp.bin"))
    os.sync()
    (work / "cp.bin").unlink()
    return {
        "md5sum_six_files_s": md5_seconds,
        "md5sum_cold": cold,
        "cp_train_x_s": cp_seconds,
        "checksums": str(checksums),
    }


def data_stages_yaml(project_dvc_yaml: Path) -> dict[str, Any]:
    """The project's fetch, validate and preprocess stages, each command followed by the marker
    that ends its own time."""
    stages = yaml.safe_load(project_dvc_yaml.read_text())["stages"]
    chosen = {name: dict(stages[name]) for name in DATA_STAGES}
    for name, stage in chosen.items():
        stage["cmd"] = f"{stage['cmd']} && echo {STAGE_DONE} {name}"
    return {"stages": chosen}


def make_repo(
    repo: Path, settings: dict[str, Any], source: Path, checksums: str, config: str, code: Path
) -> None:
    """A git + DVC repository running the data stages of the project tree `code` on `source`,
    with the params `settings` (fetch's source, input and checksums set here)."""
    repo.mkdir(parents=True)
    shutil.copytree(code / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(data_stages_yaml(code / "dvc.yaml")))
    settings = copy.deepcopy(settings)
    settings["fetch"].update(source="path", input=str(source), checksums=checksums)
    (repo / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    env = quiet_env()
    for command in (["git", "init", "-q"], [dvc_executable(), "init", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True)
    (repo / ".dvc" / "config").write_text(config)
    site = repo.parent / f"{repo.name}-site"
    with open(repo / ".dvc" / "config.local", "w") as local:
        local.write(f"[core]\n    site_cache_dir = {site}\n")
    git = ["git", "-c", "user.name=perf", "-c", "user.email=perf@pcam.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "perf"], cwd=repo, env=env, check=True)


def dvc_executable() -> str:
    return shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def quiet_env(code: Path | None = None) -> dict[str, str]:
    """DVC without analytics, output unbuffered; `code`: run the stages from that tree's src/."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if code is not None:
        env["PYTHONPATH"] = str(code.resolve() / "src")
    return env


def timestamped_repro(repo: Path, code: Path) -> tuple[float, list[tuple[float, str]]]:
    """`dvc repro preprocess` in `repo`: its wall seconds and each output line with the second
    it arrived, counted from the start."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [dvc_executable(), "repro", "preprocess"],
        cwd=repo,
        env=quiet_env(code),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert process.stdout is not None
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in process.stdout]
    code = process.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise PerfError(f"`dvc repro preprocess` failed in {repo} ({code}):\n{tail}")
    return seconds, lines


def split_times(total: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Each stage's own seconds and DVC's around them, from the timestamped output: `before
    <stage>` is DVC's time since the previous stage ended (or since the start)."""
    parts: dict[str, float] = {}
    previous_end = 0.0
    for stage in DATA_STAGES:
        command_line = next(
            (when for when, line in lines if line.startswith("> ") and f"pcam {stage}" in line),
            None,
        )
        done = next((when for when, line in lines if line.strip() == f"{STAGE_DONE} {stage}"), None)
        if command_line is None or done is None:
            raise PerfError(f"`dvc repro` did not run stage {stage} (its output has no marker)")
        parts[f"dvc before {stage}"] = command_line - previous_end
        parts[f"{stage} itself"] = done - command_line
        previous_end = done
    parts["dvc after preprocess"] = total - previous_end
    stages = sum(parts[f"{stage} itself"] for stage in DATA_STAGES)
    parts["stages"] = stages
    parts["dvc bookkeeping"] = total - stages
    parts["dvc repro"] = total
    return parts


def run_variant(
    variant: Variant, params: Params, source: Path, tools: dict[str, Any], work: Path
) -> dict[str, Any]:
    label, code, config, settings = variant
    repo = work / label.replace(" ", "-")
    make_repo(repo, settings, source, tools["checksums"], config, code)
    os.sync()
    for path in source.iterdir():  # every variant starts from a cold page cache
        evict(path)
    log.info("repro-full: dvc repro preprocess with %s", label)
    load_before = os.getloadavg()[0]
    total, lines = timestamped_repro(repo, code)
    load_after = os.getloadavg()[0]
    times = split_times(total, lines)
    dataset = source_dir_size(source)
    used = disk_used(repo / "data", repo / ".dvc" / "cache")
    result = {
        "code": str(code),
        "config": config,
        "seconds": times,
        "bookkeeping_fraction": times["dvc bookkeeping"] / total,
        "disk_bytes": used,
        "disk_over_dataset": used / dataset,
        # what the repository adds to the shared copy: nothing where data/pcam links it
        "disk_beyond_source_bytes": disk_used(source, repo / "data", repo / ".dvc" / "cache")
        - disk_used(source),
        "load_1min_before_after": [load_before, load_after],
        "status_s": timed_dvc(repo, code, "status"),
        "noop_repro_s": timed_dvc(repo, code, "repro", "preprocess"),
        "output": [f"{when:8.2f}  {line}" for when, line in lines],
    }
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(work / f"{repo.name}-site", ignore_errors=True)
    return result


def timed_dvc(repo: Path, code: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [dvc_executable(), *args], cwd=repo, env=quiet_env(code), capture_output=True, check=True
    )
    return time.perf_counter() - start


def format_table(result: dict[str, Any]) -> str:
    variants = result["variants"]
    names = list(variants)
    rows = list(next(iter(variants.values()))["seconds"])
    width = max(len(row) for row in rows) + 2
    lines = ["part (seconds)".ljust(width) + "".join(f"{name[:15]:>16}" for name in names)]
    for row in rows:
        cells = "".join(f"{variants[name]['seconds'][row]:16.1f}" for name in names)
        lines.append(row.ljust(width) + cells)
    fraction = "".join(f"{variants[n]['bookkeeping_fraction']:16.0%}" for n in names)
    lines.append("bookkeeping share".ljust(width) + fraction)
    disk = "".join(f"{variants[n]['disk_bytes'] / 1e9:13.1f} GB" for n in names)
    lines.append("disk (data/ + .dvc/cache)".ljust(width) + disk)
    beyond = "".join(f"{variants[n]['disk_beyond_source_bytes'] / 1e9:13.1f} GB" for n in names)
    lines.append("disk beyond the shared copy".ljust(width) + beyond)
    ratio = "".join(f"{variants[n]['disk_over_dataset']:15.1f}x" for n in names)
    lines.append("disk / dataset".ljust(width) + ratio)
    load = "".join(
        "{:>16}".format("{:.1f}/{:.1f}".format(*variants[n]["load_1min_before_after"]))
        for n in names
    )
    lines.append("load average before/after".ljust(width) + load)
    lines.append(
        f"dataset {result['dataset_bytes'] / 1e9:.2f} GB; md5sum of the six files "
        f"{result['tools']['md5sum_six_files_s']:.1f} s, cp of the train file "
        f"{result['tools']['cp_train_x_s']:.1f} s"
    )
    return "\n".join(lines)


def variants(project: Path, baselines: list[Path], params: Params) -> list[Variant]:
    """What is compared: each `baselines` tree (an earlier commit's export, labelled by its
    directory's name) with its own DVC configuration and params, or else DVC's defaults, then
    this tree and its .dvc/config."""
    ours = params.as_dict()
    before: list[Variant] = []
    for baseline in baselines:
        config = baseline / PROJECT_CONFIG
        own = baseline / "params.yaml"
        before.append(
            (
                baseline.name,
                baseline,
                config.read_text() if config.exists() else DEFAULT_CONFIG,
                yaml.safe_load(own.read_text()) if own.exists() else ours,
            )
        )
    if not before:
        before.append(("dvc defaults", project, DEFAULT_CONFIG, ours))
    return [*before, ("this tree", project, (project / PROJECT_CONFIG).read_text(), ours)]


def repro_full(
    params: Params,
    patches: int = PCAM_TRAIN_PATCHES,
    directory: Path = FULL_DIR,
    baselines: list[Path] | None = None,
) -> dict[str, Any]:
    """`dvc repro` of the data stages on a `patches`-patch train split, before (each of
    `baselines`, or DVC's default configuration) and after, one after the other in one run."""
    root = Path(directory)
    check_disk(root, int(COPIES_NEEDED * (patches + 2 * FULL_OTHER_SPLITS) * PATCH_BYTES))
    compared = variants(Path.cwd(), baselines or [], params)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="repro-", dir=root))
    try:
        source = work / "shared-copy"
        log.info("repro-full: writing %d train patches under %s", patches, source)
        result: dict[str, Any] = write_full_pcam(source, params, patches)
        result["dataset_bytes"] = source_dir_size(source)
        result["tools"] = tools = tools_side_by_side(source, work)
        result["variants"] = {
            variant[0]: run_variant(variant, params, source, tools, work) for variant in compared
        }
        print(format_table(result), file=sys.stderr)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if root.exists() and not any(root.iterdir()):
            root.rmdir()
