"""podman for the container tests (installed by containers/build.sh when missing), the local base
image (containers/build.sh base) and the Apptainer definition file's parser, shared by
test_container.py and test_registry.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import require_integration
from tests.integration.conftest import run_command as run

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = REPO_ROOT / "containers" / "build.sh"
PUBLISH_SH = REPO_ROOT / "containers" / "publish.sh"
DEFAULT_BASE = "localhost/debian:bookworm"
PODMAN_RUN_BASE = [
    "podman",
    "run",
    "--rm",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
]


def podman_run(*args: str) -> list[str]:
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    return [*PODMAN_RUN_BASE, *runtime, *args]


def build_env(**extra: str) -> dict[str, str]:
    """The environment without the settings of containers/*.sh (PCAM_*, TORCH_*, BASE_IMAGE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCAM_", "TORCH_"))}
    env.pop("BASE_IMAGE", None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def podman() -> str:
    """podman, runc and debootstrap, installed by containers/build.sh when missing."""
    needed = ("podman", "runc", "debootstrap")
    if not all(shutil.which(tool) for tool in needed):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            require_integration(
                "podman/runc/debootstrap missing and cannot be installed here (needs root and "
                "apt-get): run `containers/build.sh install-podman` as root"
            )
        proc = subprocess.run(
            [str(BUILD_SH), "install-podman"], capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0 or not all(shutil.which(tool) for tool in needed):
            require_integration(
                "containers/build.sh install-podman failed:\n" + (proc.stdout + proc.stderr)[-3000:]
            )
    proc = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        require_integration(f"podman is installed but `podman info` fails: {proc.stderr[-2000:]}")
    return shutil.which("podman") or "podman"


@pytest.fixture(scope="session")
def base_image(podman: str) -> str:
    name = os.environ.get("PCAM_TEST_BASE_IMAGE", DEFAULT_BASE)
    exists = subprocess.run(["podman", "image", "exists", name], timeout=60).returncode == 0
    if not exists:
        if name != DEFAULT_BASE:  # a registry image (CI: python:3.11.7-slim-bookworm): pull it
            pulled = run(["podman", "pull", "-q", name], timeout=900, check=False)
            if pulled.returncode != 0:
                pytest.fail(f"PCAM_TEST_BASE_IMAGE={name}: podman pull failed: {pulled.stderr}")
        else:
            run([str(BUILD_SH), "base"], timeout=900, env=build_env())
    return name


# --- the Apptainer definition file -------------------------------------------------------------
VALID_DEF_SECTIONS = {
    "setup", "files", "environment", "post", "runscript", "startscript", "test", "labels",
    "help", "arguments",
}  # fmt: skip


@dataclass(frozen=True)
class DefFile:
    header: dict[str, str]
    sections: dict[str, str]


def parse_def(text: str) -> DefFile:
    """Parse an Apptainer definition file: `Key: value` header lines, then `%section` bodies."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            assert current in VALID_DEF_SECTIONS, f"apptainer.def:{number}: unknown %{current}"
            assert current not in sections, f"apptainer.def:{number}: %{current} given twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep and key.strip(), f"apptainer.def:{number}: not a `Key: value` header line"
            header[key.strip()] = value.strip()
    return DefFile(header, {name: "\n".join(body) for name, body in sections.items()})
