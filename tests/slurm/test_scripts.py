"""slurm/ without a cluster: script syntax, site defaults, submit.sh's precedence rules, and the
signal forwarding that turns a time-limit warning into a checkpoint (the real-Slurm tests are in
tests/integration/test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pcam_pipeline.train import relay
from tests.conftest import REPO_ROOT

SLURM = REPO_ROOT / "slurm"
SCRIPTS = [
    "local-cluster.sh",
    "gpu-check.py",
    "submit.sh",
    "lib.sh",
    "repro.sbatch",
    "sweep.sbatch",
    "benchmark.sbatch",
    "search.sbatch",
    "serve.sbatch",
]
# site.env keys (sbatch input variables) and the #SBATCH option each stands for.
OPTION_OF = {
    "SBATCH_PARTITION": "partition",
    "SBATCH_GPUS": "gpus",
    "SBATCH_CPUS_PER_GPU": "cpus-per-gpu",
    "SBATCH_MEM_PER_NODE": "mem",
    "SBATCH_SIGNAL": "signal",
}


def site_defaults() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z_]+)=(.*)$", (SLURM / "site.env").read_text(), re.MULTILINE)
    return dict(pairs)


def sbatch_lines(script: str) -> dict[str, str]:
    text = (SLURM / script).read_text()
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", text, re.MULTILINE))


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_and_are_strict(name: str):
    path = SLURM / name
    if name.endswith(".py"):  # run by lib.sh with the runtime's python
        compile(path.read_text(), str(path), "exec")
        return
    subprocess.run(["bash", "-n", path], check=True)
    if name != "lib.sh":  # sourced by the others, which set the options
        assert "set -euo pipefail" in path.read_text()
        assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize(
    "script", ["repro.sbatch", "sweep.sbatch", "benchmark.sbatch", "search.sbatch"]
)
def test_sbatch_lines_repeat_the_site_defaults(script: str):
    """Plain `sbatch slurm/X.sbatch` gets the same Snellius defaults as slurm/submit.sh."""
    lines = sbatch_lines(script)
    for key, value in site_defaults().items():
        option = OPTION_OF.get(key)
        if option is None or not value:
            continue
        if option == "signal" and script == "benchmark.sbatch":
            assert "signal" not in lines  # nothing to checkpoint: a benchmark simply reruns...
            # ...but submit.sh exports SBATCH_SIGNAL to it too: USR1 must not kill the shell.
            assert re.search(r"^trap .*USR1$", (SLURM / script).read_text(), re.MULTILINE)
            continue
        assert lines.get(option) == value, f"{script}: #SBATCH --{option} vs site.env {key}"
    assert lines["output"].startswith("logs/%x-")
    if script != "benchmark.sbatch":
        assert "requeue" in lines


# --- submit.sh with a recording `sbatch` --------------------------------------------------------

FAKE_SBATCH = """#!/usr/bin/env python3
import json, os, sys
keys = [k for k in os.environ if k.startswith(("SBATCH_", "PCAM_"))]
record = {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keys}, "cwd": os.getcwd()}
with open(os.environ["FAKE_SBATCH_LOG"], "w") as f:
    json.dump(record, f)
print("4242")
"""


@pytest.fixture
def submit_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git repository holding slurm/, and an environment whose `sbatch` records its call."""
    repo = tmp_path / "repo"
    shutil.copytree(SLURM, repo / "slurm")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run([*git, "-C", repo, "add", "-A"], check=True)
    subprocess.run([*git, "-C", repo, "commit", "-q", "-m", "x"], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "PCAM_"))}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["FAKE_SBATCH_LOG"] = str(tmp_path / "sbatch.json")
    return repo, env


def submit(
    repo: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [repo / "slurm" / "submit.sh", *args],
        env=env,
        text=True,
        capture_output=True,
        cwd=repo.parent,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def recorded(env: dict[str, str]) -> dict:
    return json.loads(Path(env["FAKE_SBATCH_LOG"]).read_text())


def test_experiment_jobs_need_a_git_identity_and_get_the_repositorys(submit_env, tmp_path: Path):
    """Without user.name/email, `dvc exp save` fails at the end of the job: refuse at submit."""
    repo, env = submit_env
    env = {**env, "HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1"}
    for key in ("GIT_CONFIG_GLOBAL", "XDG_CONFIG_HOME"):
        env.pop(key, None)
    result = submit(repo, env, "repro", check=False)
    assert result.returncode != 0
    assert "git user.name is not set" in result.stderr
    assert "git config --global user.name" in result.stderr
    assert not Path(env["FAKE_SBATCH_LOG"]).exists()
    submit(repo, env, "benchmark")  # no experiment, no commit: no identity needed
    subprocess.run(["git", "-C", repo, "config", "user.name", "t"], check=True)
    subprocess.run(["git", "-C", repo, "config", "user.email", "t@t.invalid"], check=True)
    submit(repo, env, "repro")


def test_submit_applies_site_defaults_and_records_the_commit(submit_env):
    repo, env = submit_env
    result = submit(repo, env, "repro", "train")
    assert result.stdout.strip() == "4242"
    call = recorded(env)
    assert call["argv"] == ["--parsable", str(repo.resolve() / "slurm/repro.sbatch"), "train"]
    assert call["cwd"] == str(repo.resolve())  # jobs start in the repository
    assert (repo / "logs").is_dir()
    defaults = {k: v for k, v in site_defaults().items() if v}
    assert {k: call["env"][k] for k in defaults} == defaults
    for empty in ("SBATCH_ACCOUNT", "SBATCH_TIMELIMIT", "PCAM_SIF"):
        assert empty not in call["env"]  # empty in site.env: left to sbatch / the script
    head = subprocess.run(
        ["git", "-C", repo, "rev-parse", "HEAD"], text=True, capture_output=True, check=True
    ).stdout.strip()
    assert call["env"]["PCAM_COMMIT"] == head


def test_gpus_per_node_replace_the_sites_gpu_total(submit_env):
    """Several nodes for DDP count GPUs per node: the site's SBATCH_GPUS must not come along."""
    repo, env = submit_env
    submit(repo, env, "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "repro")
    call = recorded(env)
    assert "SBATCH_GPUS" not in call["env"]
    assert call["argv"][:4] == [
        "--parsable",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
    ]
    submit(repo, env, "--gpus=4", "repro")
    assert recorded(env)["env"]["SBATCH_GPUS"] == "1", "--gpus on the command line wins anyway"


def test_environment_beats_site_file_beats_site_env(submit_env, tmp_path: Path):
    repo, env = submit_env
    site = tmp_path / "my-site.env"
    site.write_text(
        "# my cluster\nSBATCH_PARTITION=gpu_h100\nSBATCH_CPUS_PER_GPU=16\n"
        "SBATCH_SIGNAL=\nSBATCH_ACCOUNT=abc123\n"
    )
    env = {**env, "PCAM_SLURM_SITE": str(site), "SBATCH_CPUS_PER_GPU": "4"}
    submit(repo, env, "-p", "gpu_a100", "--time=1:00:00", "benchmark")
    call = recorded(env)
    assert call["argv"][:3] == ["--parsable", "-p", "gpu_a100"]  # options given go first...
    assert call["argv"][3:] == ["--time=1:00:00", str(repo.resolve() / "slurm/benchmark.sbatch")]
    assert call["env"]["SBATCH_PARTITION"] == "gpu_h100"  # ...sbatch ranks them above env
    assert call["env"]["SBATCH_CPUS_PER_GPU"] == "4"  # environment over site file
    assert call["env"]["SBATCH_ACCOUNT"] == "abc123"  # site file over site.env
    assert "SBATCH_SIGNAL" not in call["env"]  # empty in the site file: unset, not site.env's
    assert call["env"]["SBATCH_GPUS"] == site_defaults()["SBATCH_GPUS"]  # site.env fills gaps


def test_a_bad_site_file_line_is_named(submit_env, tmp_path: Path):
    repo, env = submit_env
    site = tmp_path / "bad.env"
    site.write_text("SBATCH_PARTITION=gpu_h100\nexport SBATCH_GPUS=2\n")
    result = submit(repo, {**env, "PCAM_SLURM_SITE": str(site)}, "repro", check=False)
    assert result.returncode != 0
    assert f"{site}:2: expected KEY=VALUE" in result.stderr
    site.write_text("GPUS=2\n")
    result = submit(repo, {**env, "PCAM_SLURM_SITE": str(site)}, "repro", check=False)
    assert f"{site}:1: unknown key 'GPUS'" in result.stderr
    assert not Path(env["FAKE_SBATCH_LOG"]).exists()


def test_sweep_array_size_comes_from_the_grid(submit_env, tmp_path: Path):
    repo, env = submit_env
    grid = tmp_path / "grid.txt"
    grid.write_text(
        "# lr sweep\n-S train.lr=0.001\n\n  # off\n-S train.lr=0.002\n-S train.lr=0.004\n"
    )
    submit(repo, env, "sweep", str(grid))
    assert recorded(env)["argv"] == [
        "--parsable",
        "--array=1-3",
        str(repo.resolve() / "slurm/sweep.sbatch"),
        str(grid),
    ]
    submit(repo, env, "--array=2", "sweep", str(grid))
    assert recorded(env)["argv"][:2] == ["--parsable", "--array=2"]
    grid.write_text("# nothing\n\n")
    result = submit(repo, env, "sweep", str(grid), check=False)
    assert result.returncode != 0 and "has no task lines" in result.stderr


# --- lib.sh and the relay: a stop signal reaches `pcam train`, and only it ------------------------

FAKE_PCAM = """#!/usr/bin/env python3
import os, signal, sys, time
def stop(signum, frame):
    open(os.environ["MARK"] + ".signalled", "w").write(sys.argv[1])
    sys.exit(75)
open(os.environ["MARK"] + ".started", "w").close()
# Like the real one, which imports torch before it sets its handler: a USR1 in between kills it.
time.sleep(float(os.environ.get("HANDLER_DELAY", "0")))
signal.signal(signal.SIGUSR1, stop)
for _ in range(int(float(os.environ["TRAIN_SECONDS"]) * 10)):
    time.sleep(0.1)
"""

# Stands in for dvc: python, "train" among its arguments, runs the stage through `sh -c` like DVC.
FAKE_DVC = """#!/usr/bin/env python3
import subprocess, sys
rc = subprocess.call(["/bin/sh", "-c", sys.argv[2] + " train; exit $?"])
print(f"dvc survived, stage exited {rc}", flush=True)
sys.exit(255 if rc else 0)
"""

HARNESS = """
set -euo pipefail
source "$LIB"
PCAM_RUNTIME=venv
PCAM_VENV=$FAKE_VENV
SLURM_JOB_ID=77
eval "${PRELUDE:-}"
pcam_run_preemptible "$FAKE_VENV/bin/dvc" repro "$DELAY$FAKE_VENV/bin/pcam" train
echo "RC=$PCAM_RC SIGNAL=$PCAM_STOP_SIGNAL"
pcam_finish_or_requeue "dvc repro"
echo "not requeued"
"""

FAKE_SCONTROL = """#!/bin/sh
echo "$@" > "$MARK.scontrol"
"""

# Prefixed to the stage's command (run by `sh -c`): say the stage has started (MARK.stage), then
# hold training back until MARK.go exists (at most 20 s).
GATE = ': >"$MARK.stage"; for _ in $(seq 400); do [ -e "$MARK.go" ] && break; sleep 0.05; done; '


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def stop_requested(scratch: Path) -> bool:
    """Whether lib.sh's trap has written the stop request for the relay."""
    return any(f.stat().st_size > 0 for f in scratch.glob("pcam-stop.*"))


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (for bash: a `trap` is set), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert found, status
    return bool(int(found.group(1), 16) >> (sig - 1) & 1)


def sleeping(pid: int) -> bool:
    """Whether process `pid` is blocked (state S in /proc/PID/stat), e.g. bash in `wait`."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "S"


def run_harness(
    tmp_path: Path,
    delay: bool,
    send_signal: bool,
    restarts: int = 0,
    train_seconds: float = 30,
    prelude: str = "",
    handler_delay: float = 0,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # The venv's python (this one, with its packages) runs the relay, pcam_pipeline.train.relay.
    python = f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'
    fakes = {"pcam": FAKE_PCAM, "dvc": FAKE_DVC, "scontrol": FAKE_SCONTROL, "python": python}
    for name, text in fakes.items():
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    mark = tmp_path / "mark"
    scratch = tmp_path / "scratch"  # the job's $TMPDIR, where lib.sh keeps the stop file
    scratch.mkdir()
    env = {
        **os.environ,
        "LIB": str(SLURM / "lib.sh"),
        "FAKE_VENV": str(venv),
        "MARK": str(mark),
        # Before training: the stage's shell starts training only once the test has made
        # MARK.go (after the wrapper has handled USR1), or after 20 s.
        "DELAY": GATE if delay else "",
        "SLURM_RESTART_COUNT": str(restarts),
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "TRAIN_SECONDS": str(train_seconds),
        "PRELUDE": prelude,
        "HANDLER_DELAY": str(handler_delay),
        "TMPDIR": str(scratch),
    }
    shell = subprocess.Popen(
        ["bash", "-c", HARNESS],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if send_signal:
        if not delay:  # mid-training
            wait_for(lambda: Path(f"{mark}.started").exists(), "fake training never started")
        else:  # before training: once the batch shell waits for the stage's command
            # (the trap is set only then: a USR1 to a shell without it would kill it).
            wait_for(
                lambda: Path(f"{mark}.stage").exists() and sleeping(shell.pid),
                "the stage never started, or the batch shell never waited for it",
            )
            assert catches(shell.pid, signal.SIGUSR1), "lib.sh has not trapped USR1"
        shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@secs does: to the batch shell
        if delay:
            # Let training start once the trap has written the request and the relay has looked
            # for training at least once and found none.
            wait_for(lambda: stop_requested(scratch), "the trap never wrote the stop request")
            time.sleep(3 * relay.POLL_SECONDS)
            Path(f"{mark}.go").touch()
    out, _ = shell.communicate(timeout=60)
    assert not list(scratch.glob("pcam-stop.*")), "the stop file was left behind"
    return subprocess.CompletedProcess(shell.args, shell.returncode, out, ""), mark


@pytest.mark.parametrize("delay", [False, True], ids=["mid-training", "before-training"])
def test_usr1_reaches_training_only_then_the_job_requeues(tmp_path: Path, delay: bool):
    result, mark = run_harness(tmp_path, delay=delay, send_signal=True)
    assert Path(f"{mark}.signalled").read_text() == "train"
    assert "dvc survived, stage exited 75" in result.stdout  # neither dvc nor sh got USR1
    assert "RC=255 SIGNAL=USR1" in result.stdout
    assert Path(f"{mark}.scontrol").read_text().split() == ["requeue", "77"]
    assert "requeueing job 77 (restart 1)" in result.stdout
    assert "not requeued" not in result.stdout and result.returncode == 0


def test_without_a_signal_the_status_is_the_commands(tmp_path: Path):
    result, mark = run_harness(tmp_path, delay=False, send_signal=False, train_seconds=0.5)
    assert "RC=0 SIGNAL=" in result.stdout and "not requeued" in result.stdout
    assert not Path(f"{mark}.scontrol").exists()


def test_requeues_are_bounded(tmp_path: Path):
    result, mark = run_harness(tmp_path, delay=False, send_signal=True, restarts=20)
    assert result.returncode == 1
    assert "after 20 requeues (PCAM_MAX_REQUEUES=20): not requeueing again" in result.stdout
    assert not Path(f"{mark}.scontrol").exists()


# --- the two races a reviewer found in pcam_run_preemptible ---------------------------------------
# Each prelude makes the harness's own batch shell send itself USR1 at the exact moment of the race,
# by wrapping a builtin lib.sh uses; training is held back by the gate until the signal was handled.
# The relay makes both harmless by design (the trap only writes a file; the relay reads it whenever
# training appears): these keep it so.

# (a1) USR1 right after the trap is set, before the command (and PCAM_CHILD) exist. The old trap
# looked for training under $PCAM_CHILD: "PCAM_CHILD: unbound variable" killed the batch shell.
RIGHT_AFTER_TRAP = """
trap() {
    builtin trap "$@"
    if [[ "${*: -1}" == USR1 && "$1" != - && ! -e "$MARK.sent" ]]; then
        : >"$MARK.sent"
        kill -USR1 $$
        : >"$MARK.go"
    fi
}
"""

# (a2) USR1 after the command started, just before the batch shell blocks in `wait`: the trap ran,
# found no training yet, and the old `wait` then blocked until the command ended (no requeue).
RIGHT_BEFORE_WAIT = """
wait() {
    if [[ ! -e "$MARK.sent" ]]; then
        : >"$MARK.sent"
        kill -USR1 $$
        : >"$MARK.go"
    fi
    builtin wait "$@"
}
"""


@pytest.mark.parametrize(
    "prelude", [RIGHT_AFTER_TRAP, RIGHT_BEFORE_WAIT], ids=["after-trap", "before-wait"]
)
def test_a_usr1_at_any_moment_still_reaches_training(tmp_path: Path, prelude: str):
    result, mark = run_harness(tmp_path, delay=True, send_signal=False, prelude=prelude)
    assert Path(f"{mark}.sent").exists(), result.stdout
    assert "unbound variable" not in result.stdout, result.stdout
    assert Path(f"{mark}.signalled").read_text() == "train", result.stdout
    assert "dvc survived, stage exited 75" in result.stdout
    assert "RC=255 SIGNAL=USR1" in result.stdout
    assert Path(f"{mark}.scontrol").read_text().split() == ["requeue", "77"]
    assert result.returncode == 0, result.stdout


def test_usr1_waits_for_the_training_handler(tmp_path: Path):
    """(b) Training has started but not yet set its USR1 handler (Python importing torch): a
    signal forwarded then kills it (exit 138, nothing saved). The relay forwards only once
    /proc/<pid>/status SigCgt has the USR1 bit, retrying until it has."""
    result, mark = run_harness(tmp_path, delay=False, send_signal=True, handler_delay=3)
    assert "has not set its SIGUSR1 handler yet; retrying" in result.stdout
    assert Path(f"{mark}.signalled").read_text() == "train", result.stdout
    assert "dvc survived, stage exited 75" in result.stdout  # not 138 (killed by USR1)
    assert Path(f"{mark}.scontrol").read_text().split() == ["requeue", "77"]


# --- submit.sh: CPUs per GPU by partition, NVMe staging -------------------------------------------


@pytest.mark.parametrize(
    ("args", "extra_env", "cpus"),
    [
        ([], {}, "18"),  # site.env's partition, gpu_a100
        (["-p", "gpu_h100"], {}, "16"),
        (["--partition=gpu_h100"], {}, "16"),
        ([], {"SBATCH_PARTITION": "gpu_h100"}, "16"),
        (["-p", "gpu_h100"], {"SBATCH_CPUS_PER_GPU": "4"}, "4"),  # the environment wins
        (["-p", "gpu_mig"], {}, None),  # not in the table: the script's #SBATCH line
    ],
)
def test_cpus_per_gpu_follow_the_partition(submit_env, args, extra_env, cpus):
    repo, env = submit_env
    submit(repo, {**env, **extra_env}, *args, "repro")
    assert recorded(env)["env"].get("SBATCH_CPUS_PER_GPU") == cpus


def test_an_explicit_cpus_per_gpu_option_is_left_to_sbatch(submit_env):
    repo, env = submit_env
    submit(repo, env, "-p", "gpu_h100", "--cpus-per-gpu=8", "repro")
    call = recorded(env)
    assert "--cpus-per-gpu=8" in call["argv"] and "SBATCH_CPUS_PER_GPU" not in call["env"]


def test_staging_asks_for_nodes_with_local_nvme(submit_env):
    repo, env = submit_env
    submit(repo, {**env, "PCAM_STAGE_DATA": "1"}, "repro")
    assert "--constraint=scratch-node" in recorded(env)["argv"]
    submit(repo, {**env, "PCAM_STAGE_DATA": "1"}, "--constraint=other", "repro")
    assert "--constraint=scratch-node" not in recorded(env)["argv"]
    submit(repo, env, "repro")
    assert not any(a.startswith("--constraint") for a in recorded(env)["argv"])


def test_every_job_warns_that_it_runs_the_commit(submit_env):
    repo, env = submit_env
    (repo / "slurm" / "site.env").write_text((repo / "slurm" / "site.env").read_text() + "\n")
    result = submit(repo, env, "repro")
    assert "the repro job runs the last commit (HEAD), in a clone of its own" in result.stderr


# --- gpu-check.py: what stops a GPU job, and the fix it names -------------------------------------


def gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SLURM / "gpu-check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_problems(**overrides) -> list[str]:
    module = gpu_check_module()
    facts = {
        "torch_version": "2.13.0+cu130",
        "torch_cuda": "13.0",
        "cuda_available": True,
        "device_count": 1,
        "driver": "580.159.04",
        "min_driver": "580",
        "where": "the image /p/pcam-cu130.sif",
        "partition": "gpu_h100",
    }
    return module.problems(**{**facts, **overrides})


def test_gpu_check_passes_a_cuda_image_on_a_new_enough_driver():
    assert gpu_problems() == []


def test_gpu_check_names_a_cpu_image():
    (problem,) = gpu_problems(torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False)
    assert "the image has no CUDA" in problem and "gpu_h100" in problem
    assert "PCAM_SIF=" in problem and "PCAM_REQUIRE_CUDA=0" in problem


def test_gpu_check_names_an_old_driver():
    (problem,) = gpu_problems(driver="550.54.15", cuda_available=False, device_count=0)
    assert "driver 550.54.15 is older than the 580" in problem
    assert "TORCH_VARIANT=cu126" in problem
    # Without the image's record, the CUDA major version says what is needed.
    (problem,) = gpu_problems(driver="550.54.15", min_driver=None, cuda_available=False)
    assert "older than the 580" in problem
    assert gpu_problems(driver="525.60.13", torch_cuda="12.6", min_driver="525.60.13") == []


def test_the_driver_table_is_one_file_that_the_image_build_and_the_check_agree_on():
    """containers/cuda-min-driver.txt is the only copy: build.sh records its row in the image,
    gpu-check.py falls back on it in a venv job."""
    table = gpu_check_module().min_driver_by_cuda_major()
    assert table["13"] == "580" and {"12", "11"} <= set(table)
    for major, driver in table.items():
        built = subprocess.run(
            [REPO_ROOT / "containers" / "build.sh", "print-min-driver"],
            env={**os.environ, "TORCH_VARIANT": f"cu{major}8"},
            text=True,
            capture_output=True,
            check=True,
        )
        assert built.stdout.strip() == driver
    for user in ("containers/build.sh", "slurm/gpu-check.py"):
        assert not set(table.values()) & set((REPO_ROOT / user).read_text().split()), user


def test_gpu_check_names_a_gpu_not_passed_in():
    (problem,) = gpu_problems(cuda_available=False, device_count=0)
    assert "CUDA sees no GPU" in problem and "--nv" in problem
    (problem,) = gpu_problems(cuda_available=False, device_count=0, driver=None)
    assert "no NVIDIA driver is visible" in problem


def test_gpu_check_fails_with_exit_3_on_a_machine_without_a_gpu():
    """The real script, in this environment (a CUDA build of torch, no NVIDIA driver), as a
    GPU-partition job would run it."""
    env = {**os.environ, "SLURM_JOB_PARTITION": "gpu_a100", "PCAM_RUNTIME_DESC": "the venv x"}
    env.pop("PCAM_NODE_DRIVER", None)
    result = subprocess.run(
        [sys.executable, SLURM / "gpu-check.py"], env=env, text=True, capture_output=True
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "[pcam-slurm] error: no NVIDIA driver is visible in the job (the venv x" in result.stderr


def test_the_job_log_lists_the_mig_instances_it_was_given(tmp_path: Path):
    """--query-gpu names a slice's parent GPU only: the log's GPU lines add `nvidia-smi -L`'s MIG
    instances (here from the gpu_course stand-in, tests/integration/bin/nvidia-smi-standin)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").symlink_to(REPO_ROOT / "tests/integration/bin/nvidia-smi-standin")
    subprocess.run(["git", "init", "-q", tmp_path], check=True)  # a job runs in a clone
    script = f"source {SLURM / 'lib.sh'}; pcam_print_env {tmp_path}"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "0",
        "PCAM_RUNTIME": "venv",
        "PCAM_VENV": sys.prefix,
        "PCAM_CACHE": str(tmp_path / "cache"),
    }
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, text=True, capture_output=True
    )
    assert out.returncode == 0, out.stderr
    assert "gpus:      CUDA_VISIBLE_DEVICES=0\n" in out.stdout
    assert "           0, NVIDIA A100-SXM4-40GB, 40960 MiB, 550.127.08\n" in out.stdout
    assert re.search(r"^ {11}MIG 1g\.5gb +Device +0: \(UUID: MIG-[0-9a-f-]+\)$", out.stdout, re.M)


# --- the course profile (slurm/sites/snellius-course.env) --------------------------------------


def test_the_course_site_puts_cpu_jobs_on_thin_course_without_a_gpu(submit_env):
    repo, env = submit_env
    submit(repo, env, "--site", "snellius-course", "-p", "thin_course", "repro")
    call = recorded(env)
    assert call["argv"][:4] == ["--parsable", "-p", "thin_course", "--mincpus=8"]
    assert call["env"]["SBATCH_GPUS"] == "0"
    assert call["env"]["SBATCH_CPUS_PER_GPU"] == "1"  # not the scripts' 18: Slurm refuses that
    assert call["env"]["SBATCH_MEM_PER_NODE"] == "16G"  # the course share, not site.env's 60G


def test_the_course_site_gives_gpu_course_one_mig_slice_and_its_share(submit_env):
    """gpu_course hands out MIG slices: CPUs and memory per slice come from one setting
    (PCAM_GPU_SLICE), the memory as the slices' worth per node (SBATCH_MEM_PER_NODE replaces the
    scripts' `#SBATCH --mem=60G`; Slurm 22.05 keeps that beside an SBATCH_MEM_PER_GPU)."""
    repo, env = submit_env
    result = submit(repo, {**env, "PCAM_SLURM_SITE": "snellius-course"}, "benchmark")
    call = recorded(env)
    assert call["env"]["SBATCH_PARTITION"] == "gpu_course"
    assert call["env"]["SBATCH_GPUS"] == "1" and call["env"]["SBATCH_CPUS_PER_GPU"] == "2"
    assert call["env"]["SBATCH_MEM_PER_NODE"] == "16G"
    assert "SBATCH_MEM_PER_GPU" not in call["env"], "sbatch takes one way of sizing memory"
    assert not any(a.startswith("--mincpus") for a in call["argv"])
    assert (
        "gpu_course hands out GPU slices (MIG): 2 CPUs per slice and 16G memory per slice "
        "(--mem=16G for 1)" in result.stderr
    )
    assert "the course's to confirm" in result.stderr


@pytest.mark.parametrize(
    "gpus, memory",
    [
        (["--gpus=2"], "32G"),
        (["-G", "a100_1g.5gb:3"], "48G"),
        (["--gres=gpu:a100_1g.5gb:2"], "32G"),
        (["--gpus-per-node", "2", "--nodes=2"], "32G"),
    ],
)
def test_the_slice_memory_scales_with_the_slices_asked_for(submit_env, gpus, memory):
    repo, env = submit_env
    submit(repo, env, "--site", "snellius-course", *gpus, "benchmark")
    assert recorded(env)["env"]["SBATCH_MEM_PER_NODE"] == memory


def test_the_users_own_share_beats_the_slice_setting(submit_env):
    repo, env = submit_env
    smaller = {**env, "SBATCH_CPUS_PER_GPU": "1", "SBATCH_MEM_PER_NODE": "1000M"}
    submit(repo, smaller, "--site", "snellius-course", "benchmark")
    call = recorded(env)
    assert call["env"]["SBATCH_CPUS_PER_GPU"] == "1"
    assert call["env"]["SBATCH_MEM_PER_NODE"] == "1000M" and "SBATCH_MEM_PER_GPU" not in call["env"]
    submit(repo, env, "--site", "snellius-course", "--cpus-per-gpu=4", "--mem=8G", "benchmark")
    call = recorded(env)
    assert "SBATCH_MEM_PER_GPU" not in call["env"] and "SBATCH_CPUS_PER_GPU" not in call["env"]
    assert "--cpus-per-gpu=4" in call["argv"] and "--mem=8G" in call["argv"]
    bad = submit(
        repo,
        {**env, "PCAM_GPU_SLICE": "gpu_course:2"},
        "--site=snellius-course",
        "benchmark",
        check=False,
    )
    assert bad.returncode != 0 and "is not PARTITION:CPUS:MEMORY" in bad.stderr


@pytest.mark.parametrize(
    ("args", "lead"),
    [
        (["--time=00:20:00"], 120),  # 10 % of 1200 s
        (["-t", "20"], 120),  # MM
        ([], 360),  # the course's SBATCH_TIMELIMIT=01:00:00
        (["--time=5:00"], 60),  # the floor: 10 % of 300 s is 30 s
        (["--time=1-00:00:00"], 600),  # the cap
    ],
)
def test_the_course_signal_lead_scales_with_the_time_limit(submit_env, args, lead):
    repo, env = submit_env
    result = submit(repo, env, "--site=snellius-course", *args, "repro")
    assert recorded(env)["env"]["SBATCH_SIGNAL"] == f"B:USR1@{lead}"
    assert f"comes {lead} s before" in result.stderr


def test_an_explicit_signal_beats_the_lead_rule(submit_env):
    repo, env = submit_env
    submit(repo, env, "--site", "snellius-course", "--signal=B:USR1@30", "repro")
    assert "SBATCH_SIGNAL" not in recorded(env)["env"]
    submit(repo, {**env, "SBATCH_SIGNAL": "B:USR1@45"}, "--site", "snellius-course", "repro")
    assert recorded(env)["env"]["SBATCH_SIGNAL"] == "B:USR1@45"
    submit(repo, env, "repro")  # without the course site: site.env's fixed lead, as before
    assert recorded(env)["env"]["SBATCH_SIGNAL"] == "B:USR1@600"


def test_an_unknown_site_name_lists_the_known_ones(submit_env):
    repo, env = submit_env
    result = submit(repo, env, "--site", "nope", "repro", check=False)
    assert result.returncode == 1 and "snellius-course" in result.stderr
    bad = submit(repo, env, "--site=snellius-course", "--time=soon", "repro", check=False)
    assert bad.returncode == 1 and "'soon' is not a Slurm time" in bad.stderr


# --- serve: a server's own shares, no requeue ---------------------------------------------------


def test_serve_sbatch_asks_for_no_gpu_and_never_requeues():
    """A server is no training job: CPU cores and a little memory, no GPU unless asked for, and
    no requeue (a requeued server would come back on another node, port and token)."""
    lines = sbatch_lines("serve.sbatch")
    assert "gpus" not in lines and "cpus-per-gpu" not in lines and "requeue" not in lines
    assert "no-requeue" in lines
    assert lines["cpus-per-task"] and lines["mem"] and lines["time"]
    assert lines["output"] == "logs/%x-%j.out"
    text = (SLURM / "serve.sbatch").read_text()
    # site.env's --signal=B:USR1@... reaches it too: USR1 must not kill the batch shell.
    assert re.search(r"^trap .*USR1$", text, re.MULTILINE)
    # The token never appears on a command line (ps shows those): a file, mode 600.
    assert "--token-file" in text and "0o600" in text and "PCAM_SERVE_TOKEN=" not in text


def test_serve_takes_its_own_shares_not_the_training_ones(submit_env):
    repo, env = submit_env
    serve_env = {**env, "PCAM_SERVE_PARTITION": "rome", "PCAM_SERVE_CPUS": "8"}
    result = submit(repo, serve_env, "serve", "--precision", "int8")
    assert result.stdout.strip() == "4242"
    assert "the job's log has the SSH tunnel" in result.stderr
    call = recorded(env)
    script = str(repo.resolve() / "slurm/serve.sbatch")
    assert call["argv"] == ["--parsable", "--cpus-per-task=8", script, "--precision", "int8"]
    assert call["env"]["SBATCH_PARTITION"] == "rome"
    for training_share in ("SBATCH_GPUS", "SBATCH_CPUS_PER_GPU", "SBATCH_MEM_PER_NODE"):
        assert training_share not in call["env"]  # serve.sbatch's own #SBATCH lines apply
    assert call["env"]["SBATCH_SIGNAL"] == site_defaults()["SBATCH_SIGNAL"]  # trapped: a note
    assert call["env"]["PCAM_COMMIT"]
    submit(repo, {**serve_env, "PCAM_SERVE_MEM": "4G", "PCAM_STAGE_DATA": "1"}, "-c", "2", "serve")
    call = recorded(env)
    assert call["argv"] == ["--parsable", "-c", "2", script]  # no staging constraint
    assert call["env"]["SBATCH_MEM_PER_NODE"] == "4G"


def test_serve_gets_a_gpu_only_when_asked(submit_env):
    """site.env sends a server to the CPU partition rome; on a GPU partition (gpu_a100, the
    training jobs' default) a server without a GPU is refused with the fix, and gets one only
    from an option or PCAM_SERVE_GPUS."""
    repo, env = submit_env
    on_gpus = {**env, "PCAM_SERVE_PARTITION": ""}  # empty: the site's partition, gpu_a100
    refused = submit(repo, on_gpus, "serve", check=False)
    assert refused.returncode == 1
    assert "'gpu_a100' is a GPU partition and a serve job asks for no GPU" in refused.stderr
    assert "PCAM_SERVE_PARTITION" in refused.stderr and "--gpus=1" in refused.stderr
    assert not Path(env["FAKE_SBATCH_LOG"]).exists()
    submit(repo, env, "serve")
    call = recorded(env)
    assert call["env"]["SBATCH_PARTITION"] == "rome" and "SBATCH_GPUS" not in call["env"]
    submit(repo, env, "-p", "genoa", "serve")  # a CPU partition on the command line
    call = recorded(env)
    assert call["argv"][:3] == ["--parsable", "-p", "genoa"] and "SBATCH_GPUS" not in call["env"]
    submit(repo, env, "--gpus=1", "serve")
    call = recorded(env)
    assert "--gpus=1" in call["argv"]
    assert "SBATCH_GPUS" not in call["env"] and "SBATCH_CPUS_PER_GPU" not in call["env"]
    submit(repo, {**env, "PCAM_SERVE_GPUS": "1"}, "serve")
    assert recorded(env)["env"]["SBATCH_GPUS"] == "1"


def test_serve_on_the_course_profile_keeps_its_limit_and_signal_lead(submit_env):
    repo, env = submit_env
    result = submit(repo, env, "--site", "snellius-course", "-p", "thin_course", "serve")
    call = recorded(env)
    assert not any(a.startswith("--mincpus") for a in call["argv"])  # the cores: serve.sbatch's
    assert "SBATCH_GPUS" not in call["env"] and "SBATCH_MEM_PER_NODE" not in call["env"]
    assert call["env"]["SBATCH_TIMELIMIT"] == "01:00:00"
    assert call["env"]["SBATCH_SIGNAL"] == "B:USR1@360" and "comes 360 s before" in result.stderr


@pytest.mark.parametrize("option", ["--port", "--port=9000", "--host=0.0.0.0", "--token-file"])
def test_serve_refuses_the_options_the_job_sets(submit_env, option: str):
    repo, env = submit_env
    result = submit(repo, {**env, "PCAM_SERVE_PARTITION": "rome"}, "serve", option, check=False)
    assert result.returncode == 1
    assert f"the job sets {option.split('=')[0]} itself" in result.stderr
    assert not Path(env["FAKE_SBATCH_LOG"]).exists()
