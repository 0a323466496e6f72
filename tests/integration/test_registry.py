"""`make image-push` (containers/publish.sh push) for real, against a registry on this machine.

GHCR cannot be reached from here: the same push runs against Debian's docker-registry (the reference
registry, `containers/publish.sh local-registry` installs and starts it on 127.0.0.1, plain HTTP),
with podman. The image pushed is a few-kB stand-in (the push does not depend on the image's size;
the real images are built and run in test_container.py). What this checks: the tags (commit, and
version on a v-tag), the digest the target prints and records for the SIF step, that the registry
serves that digest under both tags, that the image comes back by digest, and that the SIF
definition made from that reference keeps the def file's sections. What it does not: GHCR's login,
docker (not installed here), Apptainer (cannot be installed here).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, run_command
from tests.integration.container_fixtures import PUBLISH_SH, build_env, parse_def, podman

pytestmark = pytest.mark.heavy
__all__ = ["podman"]  # the fixture, used by name

REPO_ROOT = Path(__file__).resolve().parents[2]
STAND_IN = "localhost/pcam-pipeline:registry-test"


@pytest.fixture(scope="module")
def registry(podman: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("registry")
    port = str(free_port())
    run_command([PUBLISH_SH, "local-registry", "start", directory, port], timeout=600)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        run_command([PUBLISH_SH, "local-registry", "stop", directory, port], check=False)


@pytest.fixture(scope="module")
def stand_in_image(podman: str) -> Iterator[str]:
    """A tiny image (one file), labelled like the real one, named like the real one."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        payload = b"a stand-in for pcam-pipeline\n"
        info = tarfile.TarInfo("README")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    change = "LABEL org.opencontainers.image.title=pcam-pipeline"
    subprocess.run(
        ["podman", "import", "--change", change, "-", STAND_IN],
        input=data.getvalue(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    image_id = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", STAND_IN],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    yield STAND_IN
    # Every tag the pushes gave it (registry/acme/pcam-pipeline:...) goes with the image.
    subprocess.run(["podman", "rmi", "-f", image_id], capture_output=True, timeout=120)


def registry_get(url: str, accept: str = "") -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), dict(response.headers)


MANIFESTS = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def test_image_push_tags_by_commit_and_version_and_records_the_digest(
    registry: str, stand_in_image: str, tmp_path: Path
):
    commit = "0123456789abcdef0123456789abcdef01234567"
    version = run_command(
        ["sed", "-n", r's/^version *= *"\([^"]*\)".*/\1/p', REPO_ROOT / "pyproject.toml"]
    ).stdout.strip()
    env = build_env(
        PCAM_IMAGE=stand_in_image,
        PCAM_ENGINE="podman",
        PCAM_REGISTRY=f"{registry}/acme",
        PCAM_TLS_VERIFY="0",
        PCAM_COMMIT_SHA=commit,
        PCAM_VERSION_TAG=f"v{version}",
        PCAM_BUILD_DIR=str(tmp_path),
        TORCH_VARIANT="cpu",
    )
    pushed = run_command(
        ["make", "--no-print-directory", "-s", "image-push"], cwd=REPO_ROOT, env=env, timeout=600
    )
    ref = pushed.stdout.strip().splitlines()[-1]
    assert ref.startswith(f"{registry}/acme/pcam-pipeline@sha256:"), pushed.stdout
    assert (tmp_path / "image-cpu.ref").read_text().strip() == ref
    digest = ref.split("@", 1)[1]

    tags, _ = registry_get(f"http://{registry}/v2/acme/pcam-pipeline/tags/list")
    assert sorted(json.loads(tags)["tags"]) == sorted([f"cpu-{commit[:12]}", f"cpu-{version}"])
    for tag in (f"cpu-{commit[:12]}", f"cpu-{version}"):
        _, headers = registry_get(
            f"http://{registry}/v2/acme/pcam-pipeline/manifests/{tag}", MANIFESTS
        )
        assert headers["Docker-Content-Digest"] == digest, tag

    # The image comes back by that digest, labels and all.
    run_command(["podman", "rmi", "-f", ref], check=False, timeout=120)
    run_command(["podman", "pull", "-q", "--tls-verify=false", ref], timeout=300)
    labels = json.loads(
        run_command(["podman", "image", "inspect", "--format", "{{json .Labels}}", ref]).stdout
    )
    assert labels["org.opencontainers.image.title"] == "pcam-pipeline"
    run_command(["podman", "rmi", "-f", ref], check=False, timeout=120)

    # The SIF step builds from exactly that reference, keeping the def file's sections.
    made = run_command([PUBLISH_SH, "registry-def"], env=env, timeout=60).stdout
    definition = parse_def(made)
    assert definition.header == {"Bootstrap": "docker", "From": ref}
    ours = parse_def((REPO_ROOT / "containers" / "apptainer.def").read_text())
    assert definition.sections == ours.sections


def test_a_version_tag_must_match_the_project_version(registry: str, stand_in_image: str):
    env = build_env(
        PCAM_IMAGE=stand_in_image,
        PCAM_ENGINE="podman",
        PCAM_REGISTRY=f"{registry}/acme",
        PCAM_TLS_VERIFY="0",
        PCAM_VERSION_TAG="v99.0.0",
    )
    result = run_command([PUBLISH_SH, "push"], env=env, check=False, timeout=120)
    assert result.returncode == 1
    assert "tag v99.0.0 does not match pyproject.toml's version" in result.stderr
