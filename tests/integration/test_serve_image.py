"""The serving image (containers/Dockerfile's `serve` target, `TORCH_VARIANT=serve make image`)
built and run for real with podman.

It is built from this checkout's code with the exported model of the session's `pipeline_repo`
(the shared `make run`; `PCAM_EXPORT_DIR`), on the local Debian base of the container tests. Run
as its users run it (published port on loopback, read-only root, the token in the environment),
it must answer an Open Inference Protocol request with the probabilities ONNX Runtime gives in this
process, as a user that is not root, without torch or DVC, with a working HEALTHCHECK, and exit 0
on `podman stop` (SIGTERM). Its size is written beside the training image's to
reports/serve-image.json.

Skipped (with the reason) only where podman cannot be installed; with PCAM_REQUIRE_INTEGRATION=1
(CI) that is a failure instead. Settings: PCAM_TEST_BASE_IMAGE and PCAM_TEST_CONTAINER_NO_CACHE=1,
as in test_container.py.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.integration.conftest import free_port
from tests.integration.conftest import run_command as run
from tests.integration.container_fixtures import BUILD_SH, base_image, build_env, podman, podman_run
from tests.serving import TOKEN, infer_binary, probabilities, request

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT = REPO_ROOT / "reports" / "serve-image.json"
SERVE_LOCK = REPO_ROOT / "requirements-serve.lock"
# The goal of issue 28: the serving image under a tenth of the training image. What is asserted
# is a looser guard against the training stack (torch) creeping back in; the report holds the
# measured ratio.
GOAL_RATIO = 0.10
GUARD_RATIO = 0.25
__all__ = ["base_image", "podman"]  # fixtures from container_fixtures, used here by name

pytestmark = pytest.mark.heavy


@dataclass(frozen=True)
class ServeImage:
    name: str
    seconds: float
    size_bytes: int
    inspect: dict[str, Any]
    export_dir: Path
    commit: str


def version() -> str:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def head_commit(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], cwd=repo, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def serve_image(base_image: str, pipeline_repo: Path) -> ServeImage:
    """`TORCH_VARIANT=serve containers/build.sh image` with the session pipeline's export."""
    export_dir = pipeline_repo / "models" / "export"
    env = build_env(BASE_IMAGE=base_image, TORCH_VARIANT="serve", PCAM_EXPORT_DIR=str(export_dir))
    if os.environ.get("PCAM_TEST_CONTAINER_NO_CACHE") == "1":
        env["PCAM_BUILD_ARGS"] = "--no-cache"
    name = run([str(BUILD_SH), "print-image"], timeout=30, env=env).stdout.strip()
    assert name == "pcam-pipeline:serve"
    start = time.monotonic()
    run([str(BUILD_SH), "image"], timeout=1800, env=env)
    seconds = time.monotonic() - start
    inspect = json.loads(run(["podman", "image", "inspect", name], timeout=60).stdout)[0]
    size = int(inspect["Size"])
    print(f"\n[test_serve_image] built {name} in {seconds:.0f} s, {size / 1e6:.0f} MB")
    return ServeImage(name, seconds, size, inspect, export_dir, head_commit(pipeline_repo))


def training_image(base_image: str) -> tuple[str, int, str]:
    """(name, size, where it came from) of the training (cpu) image: the one in podman's store,
    which test_container.py's `built_image` made earlier in a whole-suite session; built here
    (layer cache) only when there is none."""
    env = build_env(BASE_IMAGE=base_image)
    name = run([str(BUILD_SH), "print-image"], timeout=30, env=env).stdout.strip()
    source = "in podman's store (test_container.py builds it earlier in a whole-suite session)"
    if subprocess.run(["podman", "image", "exists", name], timeout=60).returncode != 0:
        run([str(BUILD_SH), "image"], timeout=1800, env=env)
        source = "built by this test (no training image in podman's store)"
    inspect = json.loads(run(["podman", "image", "inspect", name], timeout=60).stdout)[0]
    return name, int(inspect["Size"]), f"{source}; created {inspect.get('Created', '?')}"


def patches_of(repo: Path, n: int = 16) -> np.ndarray:
    """The first `n` patches of the pipeline's processed test split: uint8 (n, 96, 96, 3)."""
    with h5py.File(repo / "data" / "processed" / "test.h5", "r") as handle:
        patches = np.ascontiguousarray(handle["x"][:n], dtype=np.uint8)
    assert patches.shape == (n, 96, 96, 3), patches.shape
    return patches


def onnxruntime_probabilities(export_dir: Path, patches: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: patches}
    return np.asarray(session.run(None, feed)[0], dtype=np.float32).reshape(-1)


def wait_ready(url: str, container: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if container.poll() is not None:
            raise AssertionError(
                f"the serving container exited {container.returncode}:\n{log.read_text()}"
            )
        try:
            if request(f"{url}/v2/health/ready", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout} s:\n{log.read_text()}")


def test_the_serving_image_answers_like_onnxruntime_and_stops_cleanly(
    serve_image: ServeImage, pipeline_repo: Path, tmp_path: Path
) -> None:
    """Run as documented (port published on loopback, token from the environment, read-only
    root): health without a token, the token enforced, one binary infer request equal to ONNX
    Runtime here within 1e-5, the model commit reported, non-root, no torch or DVC inside, the
    HEALTHCHECK passing, and exit code 0 on `podman stop` (SIGTERM)."""
    port, name = free_port(), f"pcam-serve-test-{os.getpid()}"
    url, log = f"http://127.0.0.1:{port}", tmp_path / "container.log"
    args = ("--name", name, "--read-only", "-e", "PCAM_SERVE_TOKEN")
    command = podman_run(*args, "-p", f"127.0.0.1:{port}:8080", serve_image.name)
    with open(log, "w") as out:
        container = subprocess.Popen(
            command,
            env={**os.environ, "PCAM_SERVE_TOKEN": TOKEN},  # not in argv: `ps` shows argv
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(url, container, log)
        bearer = {"Authorization": f"Bearer {TOKEN}"}

        patches = patches_of(pipeline_repo)
        infer = f"{url}/v2/models/pcam/infer"
        # One patch: the server answers 401 before it reads the body, and through podman's
        # network a larger unread body turns that answer into a connection reset.
        status, _, _ = request(infer, "POST", *infer_binary(patches[:1]))
        assert status == 401, "the image served an infer request without the token"
        body, headers = infer_binary(patches)
        status, _, answer = request(infer, "POST", body, {**headers, **bearer})
        assert status == 200, answer[:2000]
        served = probabilities(answer)
        expected = onnxruntime_probabilities(serve_image.export_dir, patches)
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)

        status, _, meta = request(f"{url}/v2/models/pcam", headers=bearer)
        assert status == 200, meta[:2000]
        identity = json.loads(meta)["parameters"]
        assert identity["commit"].removesuffix("-dirty") == serve_image.commit, identity
        card = json.loads((serve_image.export_dir / "model_card.json").read_text())
        assert identity["md5"] == card["files"]["model.onnx"]["md5"]

        uid = run(["podman", "exec", name, "python", "-c", "import os; print(os.getuid())"])
        assert uid.stdout.strip() not in ("", "0"), "the server runs as root"
        for module in ("torch", "dvc"):
            probe = run(["podman", "exec", name, "python", "-c", f"import {module}"], check=False)
            assert probe.returncode != 0, f"{module} imports in the serving image"
            assert f"No module named '{module}'" in probe.stderr, probe.stderr
        # The image's own HEALTHCHECK, run by podman (no systemd timer needed for this).
        health = run(["podman", "healthcheck", "run", name], timeout=60, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        start = time.monotonic()
        run(["podman", "stop", "--time", "30", name], timeout=90)
        code = container.wait(timeout=60)
        stopped = time.monotonic() - start
        assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()}"
        assert stopped < 25, f"SIGTERM took {stopped:.0f} s (podman's SIGKILL comes at 30)"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if container.poll() is None:
            subprocess.run(["podman", "rm", "--force", name], capture_output=True, timeout=120)
            container.wait(timeout=60)


def test_the_serving_image_is_small_and_holds_only_the_serving_stack(
    serve_image: ServeImage, base_image: str
) -> None:
    """Its metadata (HEALTHCHECK, user, commit, labels), its venv exactly requirements-serve.lock
    without pip, nothing of the build's pip settings kept, no start without a token, and its size
    beside the training image's (printed, and written to reports/serve-image.json)."""
    config = serve_image.inspect["Config"]
    # podman lists it beside Config (docker inside it); only the docker format keeps it.
    healthcheck = serve_image.inspect.get("Healthcheck") or config.get("Healthcheck") or {}
    test = " ".join(healthcheck.get("Test") or [])
    assert "/v2/health/ready" in test and "urllib" in test, healthcheck
    assert config["User"] not in ("", "root", "0")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PCAM_MODEL_COMMIT"].removesuffix("-dirty") == serve_image.commit
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    assert config["Cmd"][:2] == ["pcam", "--params"] and "--host" in config["Cmd"]
    labels = config.get("Labels") or {}
    assert labels["io.github.pcam-pipeline.torch-variant"] == "serve"
    assert labels["io.github.pcam-pipeline.lock"] == SERVE_LOCK.name
    card = json.loads((serve_image.export_dir / "model_card.json").read_text())
    assert labels["io.github.pcam-pipeline.model-md5"] == card["files"]["model.onnx"]["md5"]

    script = (
        "import importlib.metadata as m, json, os, shutil; "
        "print(json.dumps({'dists': sorted(f\"{d.metadata['Name']}=={d.version}\" "
        "for d in m.distributions()), 'pip': shutil.which('pip'), "
        "'build': os.path.exists('/run/pcam-build') and os.listdir('/run/pcam-build'), "
        "'pip_conf': os.path.exists('/etc/pip.conf')}))"
    )
    probe = run(podman_run("--read-only", serve_image.name, "python", "-c", script), timeout=300)
    inside = json.loads(probe.stdout.strip().splitlines()[-1])

    def norm(pin: str) -> str:
        name, _, version = pin.partition("==")
        return f"{name.lower().replace('_', '-').replace('.', '-')}=={version}"

    locked = {
        norm(line.split()[0])
        for line in SERVE_LOCK.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    installed = {norm(pin) for pin in inside["dists"]} - {norm(f"pcam-pipeline=={version()}")}
    assert installed == locked, (sorted(installed - locked), sorted(locked - installed))
    assert inside["pip"] is None and not inside["build"] and not inside["pip_conf"], inside
    # Its default command binds 0.0.0.0: without a token it must refuse to start, saying why.
    refused = run(podman_run("--read-only", serve_image.name), timeout=300, check=False)
    assert refused.returncode != 0, refused.stdout
    assert "PCAM_SERVE_TOKEN" in refused.stdout + refused.stderr, refused.stderr

    training_name, training_bytes, training_source = training_image(base_image)
    ratio = serve_image.size_bytes / training_bytes
    report = {
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "engine": run(["podman", "--version"], timeout=30).stdout.strip(),
        "cpus": os.cpu_count(),
        "base_image": base_image,
        "serve_image": serve_image.name,
        "serve_bytes": serve_image.size_bytes,
        "serve_build_seconds": round(serve_image.seconds, 1),
        "serve_build_layer_cache": os.environ.get("PCAM_TEST_CONTAINER_NO_CACHE") != "1",
        "training_image": training_name,
        "training_bytes": training_bytes,
        "training_image_source": training_source,
        "ratio": round(ratio, 4),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio < GOAL_RATIO,
        "size_is": "uncompressed, as `podman image inspect` reports it",
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n[test_serve_image] {serve_image.name} {serve_image.size_bytes / 1e6:.0f} MB vs "
        f"{training_name} {training_bytes / 1e6:.0f} MB: {ratio:.1%} (goal < {GOAL_RATIO:.0%}); "
        f"written to {REPORT.relative_to(REPO_ROOT)}"
    )
    assert ratio < GUARD_RATIO, report
