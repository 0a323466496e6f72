"""The Slurm wrappers (slurm/), submitted for real to a one-node Slurm cluster on this machine.

Apptainer cannot be installed here: where a wrapper calls `apptainer`, a clearly named stand-in
(tests/integration/bin/apptainer-standin, on PATH as `apptainer`) records its arguments and runs the
command in the project venv; the tests check the exact arguments the wrapper passed.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcam_pipeline.train.checkpoint import load_checkpoint
from tests.integration.slurm_fixtures import (
    APPTAINER_STANDIN,
    NVIDIA_SMI_STANDIN,
    VENV,
    SlurmCluster,
    Workspace,
    cache_dir,
    cache_without_training,
    dvc,
    local_cluster,
    local_threads,
    make_submit_repo,
    make_workspace,
    output_differences,
    read_json,
    run,
    wait_for_line,
)

pytestmark = pytest.mark.heavy


def same_threads() -> dict[str, str]:
    """Job settings for a result that must equal the local run's: as many CPU threads as it had."""
    threads = local_threads()
    return {"OMP_NUM_THREADS": threads, "SBATCH_CPUS_PER_GPU": str(min(int(threads), 2))}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One Slurm cluster (slurm/local-cluster.sh) for the session, stopped at its end."""
    with local_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def submit_repo(pipeline_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_submit_repo(pipeline_repo, tmp_path_factory.mktemp("slurm-submit") / "repo")


@pytest.fixture(scope="session")
def shared_cache(pipeline_repo: Path) -> Path:
    """The local run's DVC cache, shared by every job: what ran there is restored, not rerun."""
    return cache_dir(pipeline_repo)


@pytest.fixture
def workspace(
    slurm_cluster: SlurmCluster, submit_repo: Path, shared_cache: Path, tmp_path: Path
) -> Workspace:
    return make_workspace(slurm_cluster, submit_repo, shared_cache, tmp_path)


@pytest.fixture
def untrained_workspace(
    slurm_cluster: SlurmCluster,
    submit_repo: Path,
    shared_cache: Path,
    pipeline_repo: Path,
    tmp_path: Path,
) -> Workspace:
    """A workspace whose DVC cache (a copy of the shared one) has the data stages but no
    checkpoints and no run-cache: its jobs must really train."""
    cache = cache_without_training(shared_cache, pipeline_repo, tmp_path / "cache")
    return make_workspace(slurm_cluster, submit_repo, cache, tmp_path)


# How lib.sh runs a command that training may be in: under the relay (pcam_pipeline.train.relay).
RELAY = ["python", "-m", "pcam_pipeline.train.relay", "--stop-file"]


def command(argv: list[str]) -> list[str]:
    """What an `apptainer exec --nv --cleanenv --bind BINDS IMAGE ...` call ran, less the relay."""
    ran = argv[6:]
    return ran[ran.index("--") + 1 :] if ran[:4] == RELAY else ran


def job_log(ws: Workspace, name: str, job_id: str) -> str:
    path = ws.log(f"{name}-{job_id}.out")
    assert path.exists(), f"no log {path}; logs/ has {sorted(p.name for p in ws.log('').glob('*'))}"
    return path.read_text()


def test_repro_through_the_apptainer_standin_with_staged_data_matches_the_local_run(
    untrained_workspace: Workspace, pipeline_repo: Path, tmp_path: Path
):
    """repro.sbatch with PCAM_SIF and PCAM_STAGE_DATA=1, run by real Slurm, but NOT in Apptainer.

    `apptainer` on the job's PATH is tests/integration/bin/apptainer-standin, which logs its
    arguments and the APPTAINERENV_* it was given and runs the command on the host in the project
    venv, with the environment emptied as --cleanenv does (plus APPTAINERENV_*). What this checks:
    the wrapper's exact `apptainer exec --nv --cleanenv --bind ... IMAGE dvc ...` calls, that the
    jobs work with only the environment they pass (the checkout's src/ on PYTHONPATH, the per-user
    DVC site cache, the image digest), the job's own clone of the submitted commit (the workspace is
    never touched: the result comes back as an experiment), node-local staging on a
    `--constraint=scratch-node` node and its cleanup, the checkpoints' provenance, and outputs equal
    to the local run's. What it does not: no image is built or opened (pcam.sif is a text file the
    stand-in only checks exists), so not the image's Python and packages; no mount namespace
    (binds are only checked to exist and to cover the working directory); no GPU behind --nv. The
    image is tested in tests/integration/test_container.py.
    """
    ws = untrained_workspace
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").symlink_to(APPTAINER_STANDIN)
    sif = tmp_path / "images" / "pcam.sif"
    sif.parent.mkdir()
    sif.write_bytes(b"not really an image: the apptainer stand-in runs the project venv\n")
    calls_log = tmp_path / "apptainer-calls.jsonl"
    scratch = Path(ws.env["TMPDIR"])
    site_cache = tmp_path / "home-cache" / "dvc-site"
    workspace_lock = (ws.path / "dvc.lock").read_text()
    commit = run(["git", "rev-parse", "HEAD"], cwd=ws.path).stdout.strip()

    job = ws.submit(
        "repro",
        PCAM_SIF=str(sif),
        PCAM_STAGE_DATA="1",
        PCAM_DVC_SITE_CACHE=str(site_cache),
        **same_threads(),
        PATH=f"{bin_dir}:{ws.env['PATH']}",
        APPTAINER_STANDIN_LOG=str(calls_log),
        APPTAINER_STANDIN_VENV=str(VENV),
    )
    record = ws.cluster.wait(job, log=ws.log(f"pcam-repro-{job}.out"))
    log = job_log(ws, "pcam-repro", job)
    assert (record.state, record.exit_code, record.partition) == ("COMPLETED", "0:0", "ci"), log

    # The job ran in its own clone and left the workspace alone; its result is an experiment.
    name = f"repro-{job}"
    work = ws.path.resolve() / ".pcam-work" / name
    assert f"working in {work}" in log
    assert (ws.path / "dvc.lock").read_text() == workspace_lock
    assert not work.exists(), "the clone is removed after the push"
    assert "Running stage 'train'" in log
    ws.apply(name)
    # The same outputs as the local, uninterrupted `dvc repro` of the same commit.
    assert output_differences(ws.path, pipeline_repo) == []
    assert read_json(ws.path / "reports/metrics.json") == read_json(
        pipeline_repo / "reports/metrics.json"
    )

    # Each dvc command ran as `apptainer exec --nv --cleanenv --bind <binds> IMAGE ...`.
    calls = [json.loads(line) for line in calls_log.read_text().splitlines()]
    calls = [c for c in calls if c["argv"] != ["--version"]]
    prefix = ["exec", "--nv", "--cleanenv", "--bind"]
    assert all(c["argv"][:4] == prefix and c["argv"][5] == str(sif) for c in calls)
    commands = [command(c["argv"]) for c in calls]
    assert commands[:2] == [["dvc", "cache", "dir"], ["dvc", "config", "core.site_cache_dir"]]
    assert ["dvc", "repro", "preprocess"] in commands  # staging
    run_calls = [c for c in calls if command(c["argv"])[:3] == ["dvc", "exp", "run"]]
    assert [command(c["argv"])[3:] for c in run_calls] == [["-n", name]]  # not a GPU partition
    (run_call,) = run_calls
    # Under the relay, which reads the stop request from the job's (bound) scratch directory.
    assert run_call["argv"][6:10] == RELAY
    assert Path(run_call["argv"][10]).parent == scratch
    binds = run_call["argv"][4].split(",")
    assert any(str(work) == b or str(work).startswith(f"{b}/") for b in binds)  # via the repo
    assert str(scratch) in binds and str(site_cache) in binds
    assert run_call["cwd"] == str(work)
    # What reaches the container: the clone's code, the per-user site cache, the image digest.
    digest = "sha256:" + hashlib.sha256(sif.read_bytes()).hexdigest()
    passed = run_call["env"]
    assert passed["APPTAINERENV_PYTHONPATH"] == str(work / "src")
    assert passed["APPTAINERENV_DVC_SITE_CACHE_DIR"] == str(site_cache)
    assert passed["APPTAINERENV_PCAM_IMAGE_DIGEST"] == digest
    assert passed["APPTAINERENV_SLURM_JOB_ID"] == job
    assert any((site_cache / "repo").iterdir()), (
        "DVC kept its hash state in the per-user site cache"
    )

    # Every checkpoint's provenance names the image it was made in (kept beside the job's log).
    for checkpoint in ("best", "last"):
        provenance = read_json(ws.log(name) / f"{checkpoint}.provenance.json")
        environment = provenance["environment"]
        assert environment["pcam_image_digest"] == digest
        assert environment["apptainer_container"] == str(sif)
        assert environment["slurm_job_id"] == job

    # The environment it printed, and the node-local copy it trained from (removed afterwards).
    assert f"image:     {sif} {digest}" in log
    assert f"commit:    {commit}" in log
    assert f"dvc site:  {site_cache}" in log
    assert "host:      " in log and "CUDA_VISIBLE_DEVICES=" in log
    staged = scratch / f"pcam-{job}" / "processed"
    assert f"staging: PCAM_TRAIN_DATA_DIR={staged}" in log
    assert not staged.parent.exists()
    # --constraint=scratch-node (site.env's PCAM_STAGE_CONSTRAINT) reached Slurm.
    shown = run(["scontrol", "show", "job", job], env=ws.cluster.env, check=False).stdout
    assert not shown or "Features=scratch-node" in shown, shown


def test_a_gpu_partition_job_fails_fast_when_it_cannot_use_a_gpu(
    workspace: Workspace, tmp_path: Path
):
    """On gpu_a100 the job must train on the GPU: where it cannot (here the stand-in image runs
    the venv, whose CUDA build of torch finds no NVIDIA driver on this machine) it fails in its
    first minute with the fix, before any DVC stage, clone or staging, instead of training on the
    CPU at GPU rates. (The CPU-only-image case: tests/slurm/test_scripts.py.)"""
    ws = workspace
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").symlink_to(APPTAINER_STANDIN)
    sif = tmp_path / "pcam-cu130.sif"
    sif.write_bytes(b"an image\n")
    calls_log = tmp_path / "apptainer-calls.jsonl"
    started = time.monotonic()
    job = ws.submit(
        "-p",
        "gpu_a100",
        "repro",
        PCAM_SIF=str(sif),
        PATH=f"{bin_dir}:{ws.env['PATH']}",
        APPTAINER_STANDIN_LOG=str(calls_log),
        APPTAINER_STANDIN_VENV=str(VENV),
    )
    record = ws.cluster.wait(job, timeout=300, log=ws.log(f"pcam-repro-{job}.out"))
    elapsed = time.monotonic() - started
    log = job_log(ws, "pcam-repro", job)
    assert (record.state, record.partition) == ("FAILED", "gpu_a100"), log
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail:\n{log}"
    assert f"no NVIDIA driver is visible in the job (the image {sif}, torch 2.13.0" in log
    assert "GPU partition 'gpu_a100'" in log and "--gpus=1" in log
    assert "`apptainer exec --nv`" in log
    assert "stopping before any work rather than training on the CPU" in log
    calls = [json.loads(line)["argv"] for line in calls_log.read_text().splitlines()]
    check = [c for c in calls if c[-1].endswith("slurm/gpu-check.py")]
    assert check and check[0][:3] == ["exec", "--nv", "--cleanenv"]
    assert not any(command(c)[:2] in (["dvc", "exp"], ["dvc", "repro"]) for c in calls)
    assert not (ws.path / ".pcam-work").exists() or not any((ws.path / ".pcam-work").iterdir())


def preempted_mid_training(ws: Workspace, *options: str, **env: str) -> tuple[str, str]:
    """A repro job sent SIGUSR1 once epoch 1 is done (so it lands mid-training), which must
    checkpoint, requeue itself, resume and complete: its id and log."""
    job = ws.submit(*options, "repro", **env)
    log_path = ws.log(f"pcam-repro-{job}.out")
    wait_for_line(log_path, r"pcam_pipeline\.train\.run: epoch 1:", 1200, ws.cluster, job)
    run(["scancel", "--signal=USR1", "--batch", job], env=ws.cluster.env)
    record = ws.cluster.wait(job, timeout=1200, log=log_path)
    log = log_path.read_text()
    assert (record.state, record.exit_code) == ("COMPLETED", "0:0"), log
    assert "forwarding SIGUSR1 to training" in log
    assert f"requeueing job {job} (restart 1)" in log
    assert "resuming from models/last.pt at epoch" in log
    return job, log


def test_usr1_mid_training_requeues_and_resumes_to_the_uninterrupted_result(
    untrained_workspace: Workspace, pipeline_repo: Path
):
    ws = untrained_workspace
    job, log = preempted_mid_training(ws, **same_threads())
    assert "received SIGUSR1" in log
    assert "restart 1 partition" in log  # the second run's header
    assert len(ws.cluster.records(job)) == 2  # one record per run: requeued, then completed
    assert f"reusing {ws.path.resolve()}/.pcam-work/repro-{job}" in log  # the rerun's own clone
    # ...where `dvc repro` resumes (`dvc exp run` would first restore the committed outputs over
    # the saved models/last.pt), then `dvc exp save` records the experiment.
    assert f"then dvc exp save -n repro-{job}" in log
    ws.apply(f"repro-{job}")
    assert read_json(ws.path / "reports/metrics.json") == read_json(
        pipeline_repo / "reports/metrics.json"
    )
    assert output_differences(ws.path, pipeline_repo) == []


def test_a_two_task_job_trains_on_both_workers_and_requeues_on_usr1(
    untrained_workspace: Workspace,
):
    """`sbatch --ntasks=2`: the train stage's `pcam train` starts its two workers with srun
    (gloo on the CPU, this cluster has one node), and the preemption contract holds for them."""
    ws = untrained_workspace
    job, log = preempted_mid_training(ws, "--ntasks=2", "--gpus=2", OMP_NUM_THREADS="1")
    assert "launching 2 training workers with srun" in log
    assert "x 2 workers" in log, "the two srun tasks formed one process group"
    ws.apply(f"repro-{job}")
    last = load_checkpoint(ws.path / "models" / "last.pt")
    assert last["provenance"]["workers"] == 2
    assert last["progress"]["complete"] and len(last["worker_rng"]) == 2


def test_sweep_pushes_one_experiment_per_grid_line(workspace: Workspace):
    ws = workspace
    lrs = ["0.0005", "0.002", "0.008"]
    grid = ws.path.parent / "grid.txt"
    grid.write_text(
        "# three learning rates, one short epoch each\n\n"
        + "".join(f"-S train.lr={lr} -S train.epochs=1\n" for lr in lrs)
    )
    array = ws.submit("sweep", str(grid))
    ws.cluster.wait(array, timeout=1200)
    tasks = ws.cluster.array_tasks(array)
    logs = {n: ws.log(f"pcam-sweep-{array}_{n}.out") for n in (1, 2, 3)}
    assert sorted(tasks) == [1, 2, 3]
    for n, task in tasks.items():
        text = logs[n].read_text() if logs[n].exists() else "(no log)"
        assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), text
        # The clone got the submitted commit's outputs from the shared cache: only what the
        # grid line changes ran.
        assert "Stage 'preprocess' didn't change, skipping" in text
        assert "Running stage 'train'" in text

    shown = json.loads(dvc(ws.path, "exp", "show", "--json").stdout)
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                params = data["params"]["params.yaml"]["data"]
                experiments[exp["name"]] = (
                    str(params["train"]["lr"]),
                    params["train"]["epochs"],
                    metrics["test"]["auroc"],
                )
    assert sorted(experiments) == [f"sweep-{array}-{n}" for n in (1, 2, 3)]
    for n, lr in enumerate(lrs, start=1):
        assert experiments[f"sweep-{array}-{n}"][:2] == (str(float(lr)), 1)
    assert len({auroc for _, _, auroc in experiments.values()}) == 3
    assert not any((ws.path / ".pcam-work").glob("*")), "finished tasks must remove their clones"


def test_a_search_array_runs_the_study_with_one_worker_per_task(workspace: Workspace):
    ws = workspace
    study = ws.path.parent / "slurm-study.yaml"
    study.write_text(
        "name: onslurm\nn_trials: 2\nseeds_per_trial: 1\nsampler: {seed: 3}\nparams:\n"
        "  train.lr: {distribution: log-uniform, low: 1.0e-4, high: 1.0e-2}\n"
        "  train.epochs: {distribution: choice, choices: [1]}\n"
    )
    array = ws.submit("search", str(study), "--array=0-1")
    ws.cluster.wait(array, timeout=1200)
    tasks = ws.cluster.array_tasks(array)
    assert sorted(tasks) == [0, 1]
    for n, task in tasks.items():
        log = ws.log(f"pcam-search-{array}_{n}.out")
        text = log.read_text() if log.exists() else "(no log)"
        assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), text
        assert f"worker {array}_{n} of study" in text
    shown = json.loads(dvc(ws.path, "exp", "show", "--json").stdout)
    names = [exp["name"] for row in shown for exp in row.get("experiments") or []]
    assert sorted(names) == ["onslurm-t0-s1", "onslurm-t1-s1"]
    report = read_json(ws.path / "reports" / "search" / "onslurm" / "trials.json")
    assert sorted(t["number"] for t in report["trials"]) == [0, 1]
    assert not any((ws.path / ".pcam-work" / "search" / "onslurm").glob("worker-*"))


def test_a_failing_stage_fails_the_job_with_its_error_in_the_log(workspace: Workspace):
    ws = workspace
    params = ws.path / "params.yaml"
    params.write_text(params.read_text().replace("  lr: 0.002", "  lr: -1", 1))
    assert "lr: -1" in params.read_text()
    ws.commit("a bad learning rate")  # the job runs the submitted commit
    job = ws.submit("repro", "train")
    record = ws.cluster.wait(job, log=ws.log(f"pcam-repro-{job}.out"))
    log = job_log(ws, "pcam-repro", job)
    assert record.state == "FAILED", log
    assert record.exit_code != "0:0"
    assert "params.yaml is not valid" in log and "train.lr" in log
    assert "dvc cache: cache.type hardlink: works" in log  # the job's cache report
    # The first stage that loads params.yaml fails (validate or train: upstream stages are
    # restored from the run-cache), and DVC says so.
    assert "ERROR: failed to reproduce '" in log and "exited with 2" in log
    assert f"dvc exp run repro-{job} failed with exit status" in log
    # The clone is kept for a look; nothing half-written where the stage's outputs go.
    work = ws.path / ".pcam-work" / f"repro-{job}"
    assert sorted(p.name for p in (work / "models").iterdir() if not p.name.startswith(".")) in (
        [],
        ["best.pt", "last.pt"],  # the commit's own outputs, restored from the cache
        ["best.pt", "export", "last.pt"],  # ... with the exported model
        ["best.pt", "drift", "export", "last.pt"],  # ... and the drift reference
    )
    assert not list((work / "models").glob(".*.tmp-*"))


# The course profile (slurm/sites/snellius-course.env) with shares this 2-core node can give: the
# environment beats the site file, as on Snellius when a course's limits are smaller still.
COURSE_ON_THIS_NODE = {
    "SBATCH_CPUS_PER_GPU": "1",
    "PCAM_CPU_PARTITION_CPUS": "thin_course:1",
    "SBATCH_MEM_PER_NODE": "1000M",
    "PCAM_REQUIRE_CUDA": "0",  # gpu_course is a GPU partition; this machine has no CUDA
}


def test_course_profile_repro_on_thin_course_with_the_scaled_signal_lead(workspace: Workspace):
    ws = workspace
    job = ws.submit(
        "--site",
        "snellius-course",
        "-p",
        "thin_course",
        "--time=00:20:00",
        "repro",
        **COURSE_ON_THIS_NODE,
    )
    record = ws.cluster.wait(job, log=ws.log(f"pcam-repro-{job}.out"))
    log = job_log(ws, "pcam-repro", job)
    assert (record.state, record.partition) == ("COMPLETED", "thin_course"), log
    assert ws.cluster.completion(job)["TimeLimit"] == "20"  # minutes
    assert "gpus:      CUDA_VISIBLE_DEVICES=unset" in log  # a CPU partition: Slurm gave no GPU
    # 10 % of 20 minutes, within the floor (60 s) and the cap (600 s) of PCAM_SIGNAL_LEAD=10:60:600
    assert "signal:    B:USR1@120" in log


def running_job(cluster: SlurmCluster, job_id: str, timeout: float = 300) -> str:
    """`scontrol show job -d` of a job once it has its resources (the allocated gres, the
    CPUs and memory per GPU); fails if it left the queue first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = run(["scontrol", "show", "job", "-d", job_id], env=cluster.env, check=False)
        if "JobState=PENDING" not in shown.stdout and shown.returncode == 0:
            return shown.stdout
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not start in {timeout} s")


def test_course_benchmarks_on_both_partitions_make_the_throughput_table(
    workspace: Workspace, slurm_cluster: SlurmCluster, tmp_path: Path
):
    """Both course partitions at once, as the course profile asks for them: thin_course with no
    GPU, gpu_course with one MIG slice of the node's typed gres (gpu:a100_1g.5gb, from an untyped
    --gpus=1) and the slice's share from its one setting, PCAM_GPU_SLICE. Each job's result is
    named by partition and job, and reports/benchmark-partitions.md/.json have a row for each."""
    ws = workspace
    # gpu_course's node answers nvidia-smi as a sliced A100 does (the stand-in; there is no GPU).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").symlink_to(NVIDIA_SMI_STANDIN)
    # This 2-core node's shares: thin_course's cores, and a slice of 1 CPU and 1000M.
    shares = {
        "thin_course": {"PCAM_CPU_PARTITION_CPUS": "thin_course:1", "SBATCH_MEM_PER_NODE": "1000M"},
        "gpu_course": {
            "PCAM_GPU_SLICE": "gpu_course:1:1000M",
            "PATH": f"{bin_dir}:{ws.env['PATH']}",
        },
    }
    jobs = {
        partition: ws.submit(
            "--site",
            "snellius-course",
            "-p",
            partition,
            "benchmark",
            PCAM_REQUIRE_CUDA="0",
            **share,
        )
        for partition, share in shares.items()
    }
    # What Slurm gave each job: one typed slice, its CPUs and memory per GPU; no GPU on thin_course.
    shown = {partition: running_job(slurm_cluster, job) for partition, job in jobs.items()}
    assert re.search(r"JOB_GRES=gpu:a100_1g\.5gb:1\b", shown["gpu_course"]), shown["gpu_course"]
    assert "GRES=gpu:a100_1g.5gb:1(IDX:" in shown["gpu_course"]
    assert "CpusPerTres=gres:gpu:1" in shown["gpu_course"]
    assert "MinMemoryNode=1000M" in shown["gpu_course"]  # one slice's worth
    assert not re.search(r"GRES=gpu:\S*:[1-9]", shown["thin_course"]), shown["thin_course"]
    for partition, job in jobs.items():
        record = slurm_cluster.wait(job, log=ws.log(f"pcam-benchmark-{job}.out"))
        log = job_log(ws, "pcam-benchmark", job)
        assert (record.state, record.partition) == ("COMPLETED", partition), log
        assert slurm_cluster.completion(job)["Tres"].startswith("cpu=1,mem=1000M,"), partition
        result = read_json(ws.path / "reports" / f"benchmark-{partition}-{job}.json")
        assert result["environment"]["slurm_job_partition"] == partition, log
        assert any((ws.path / "reports" / f"benchmark-{partition}-{job}").iterdir())
        assert "Running stage 'benchmark'" in log
    # Slurm gave gpu_course one (fake) GPU and thin_course none (the log's `gpus:` line); the
    # gpu_course log names the MIG instance its node listed.
    logs = {p: job_log(ws, "pcam-benchmark", j) for p, j in jobs.items()}
    gpus = {
        p: re.search(r"^gpus: +CUDA_VISIBLE_DEVICES=(\S+)$", text, re.M) for p, text in logs.items()
    }
    assert gpus["thin_course"] and gpus["thin_course"][1] == "unset", gpus
    assert gpus["gpu_course"] and gpus["gpu_course"][1] in ("0", "1"), gpus
    assert re.search(r"^ +MIG 1g\.5gb +Device +0: \(UUID: MIG-", logs["gpu_course"], re.M)
    assert "MIG 1g.5gb" not in logs["thin_course"]
    table = (ws.path / "reports" / "benchmark-partitions.md").read_text().splitlines()
    assert table[0].startswith(
        "| partition | node type | train img/s, batch 1 | train img/s, batch "
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:] if line.startswith("|")}
    assert rows.keys() == jobs.keys(), table
    for partition, job in jobs.items():
        assert rows[partition].endswith(f" | {job} |") and " cores | " in rows[partition]
    # Both trained on this CPU (no CUDA here): the table says it has no GPU result to compare.
    assert table[-1].startswith("No crossover: the table needs a GPU result"), table
    data = read_json(ws.path / "reports" / "benchmark-partitions.json")
    assert [(r["partition"], r["job_id"]) for r in data["rows"]] == list(jobs.items())
    assert all(r["img_s_batch1"] > 0 for r in data["rows"]), data
    # The workspace itself was not touched: the stages ran in clones.
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ws.path).stdout == ""
    assert not any((ws.path / ".pcam-work").glob("*"))


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    """GET straight to URL (never through a proxy): the status and the body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


TUNNEL = r"^tunnel: +ssh -N -L 8080:(?P<host>\S+):(?P<port>\d+) (?P<user>\S+)@(?P<login>\S+)$"


def test_serve_job_prints_its_tunnel_answers_with_its_token_and_drains_on_scancel(
    workspace: Workspace, pipeline_repo: Path
):
    """`slurm/submit.sh serve`: the submitted commit's exported model served by `pcam serve` on
    the node, on the node's address and a free port, with a per-job token in a mode-600 file
    beside the log, and the SSH tunnel printed once the server is ready. `scancel` (SIGTERM)
    drains it: the server exits 0 and the job ends. On this one-node cluster the node is
    localhost, so the printed host:port is reached directly, as the login node would."""
    ws = workspace
    commit = run(["git", "rev-parse", "HEAD"], cwd=ws.path).stdout.strip()
    job = ws.submit(
        "serve",
        PCAM_SERVE_CPUS="1",
        PCAM_SERVE_MEM="1000M",
        PCAM_LOGIN_HOST="login.cluster.invalid",  # a site-file key; here from the environment
    )
    log_path = ws.log(f"pcam-serve-{job}.out")
    tunnel = re.match(TUNNEL, wait_for_line(log_path, TUNNEL, 300, ws.cluster, job))
    assert tunnel, log_path.read_text()
    log = log_path.read_text()
    assert tunnel["login"] == "login.cluster.invalid", log
    assert "open:    http://localhost:8080/" in log and f"stop:    scancel {job}" in log
    token_line = re.search(r"^token: +(\S+)", log, re.MULTILINE)
    assert token_line, log
    token_file = Path(token_line[1])
    assert token_file == ws.path.resolve() / "logs" / f"pcam-serve-{job}.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 16 and token not in log

    base = f"http://{tunnel['host']}:{tunnel['port']}"
    assert http_get(f"{base}/v2/health/ready")[0] == 200  # no token needed
    status, body = http_get(f"{base}/v2/models/pcam", token)
    assert status == 200, body
    identity = json.loads(body)["parameters"]
    card = read_json(pipeline_repo / "models" / "export" / "model_card.json")
    assert identity["md5"] == card["files"]["model.onnx"]["md5"]  # the submitted commit's export
    assert identity["commit"] == commit
    assert http_get(f"{base}/v2/models/pcam")[0] == 401
    assert http_get(f"{base}/v2/models/pcam", "not-the-token-of-this-job")[0] == 403

    run(["scancel", job], env=ws.cluster.env)
    record = ws.cluster.wait(job, timeout=120, log=log_path)
    log = log_path.read_text()
    assert record.state in ("CANCELLED", "COMPLETED"), log
    assert "SIGTERM (scancel or the time limit): stopping the server" in log
    assert "pcam serve exited with status 0" in log
    assert not token_file.exists(), "the token goes with the job"
    assert not (ws.path / ".pcam-work" / f"serve-{job}").exists()
    with pytest.raises(urllib.error.URLError):  # nothing listens there any more
        http_get(f"{base}/v2/health/ready")


def test_a_slides_array_scores_each_slide_in_its_task_and_names_the_bad_one(
    workspace: Workspace,
):
    """`submit.sh slides LIST --out DIR`: an array of three tasks (one slide each: two generated
    slides, one unreadable file) with the workspace's exported model, then the cohort job. The
    bad slide fails its task and is named in the table and the cohort job's log; the others are
    done, with their outputs."""
    from tests.slide_files import tumour_slide_pixels, write_test_slide

    ws = workspace
    folder = ws.path.parent / "slides"
    folder.mkdir()
    write_test_slide(folder / "left.tif", 1280, 1280, seed=1)
    write_test_slide(folder / "tumour.tif", 1536, 1280, pixels=tumour_slide_pixels(1536, 1280))
    (folder / "broken.svs").write_bytes(b"not a slide")
    listing = ws.path.parent / "slides.txt"
    listing.write_text("\n".join(str(folder / n) for n in ("left.tif", "broken.svs", "tumour.tif")))
    out = ws.path.parent / "scored"
    # pcam slides (torch, WSInfer) needs more than the local site's 1000M.
    env = {**ws.env, "SBATCH_MEM_PER_NODE": "1500M"}
    submitted = run(
        [ws.path / "slurm" / "submit.sh", "slides", listing, "--out", out], ws.path, env
    )
    array, cohort = submitted.stdout.split()
    record = ws.cluster.wait(cohort, timeout=900)
    tasks = ws.cluster.array_tasks(array)
    logs = {n: ws.log(f"pcam-slides-{array}_{n}.out") for n in tasks}
    text = {n: log.read_text() if log.exists() else "(no log)" for n, log in logs.items()}
    states = {n: (task["JobState"], task["ExitCode"]) for n, task in tasks.items()}
    assert states[0] == states[2] == ("COMPLETED", "0:0"), text
    assert states[1][0] == "FAILED" and "broken.svs" in text[1], text[1]
    cohort_log = job_log(ws, "pcam-slides-cohort", cohort)
    assert record.state == "FAILED", cohort_log
    assert "1 of 3 slide(s) not scored" in cohort_log and "broken.svs" in cohort_log
    table = {row["slide_id"]: row for row in json.loads((out / "cohort.json").read_text())}
    assert {k: v["status"] for k, v in table.items()} == {
        "left": "done", "broken": "failed", "tumour": "done"
    }  # fmt: skip
    for slide_id in ("left", "tumour"):
        for folder_name, suffix in (("heatmaps", "png"), ("model-outputs-geojson", "geojson")):
            assert (out / folder_name / f"{slide_id}.{suffix}").is_file()
    # The pipeline's model scores the positive blob (right) above the negative one (left).
    summary = read_json(out / "summaries" / "tumour.json")
    assert summary["patches_above_threshold"] > 0


def test_usr1_to_a_slides_task_requeues_it_and_the_rerun_skips_the_finished_slide(
    workspace: Workspace,
):
    """The time-limit signal while a task scores the first of its three slides: it finishes that
    slide, exits 75 and requeues itself; the rerun skips it and scores the other two."""
    from tests.slide_files import write_test_slide

    ws = workspace
    folder = ws.path.parent / "slides"
    folder.mkdir()
    for seed in range(3):
        write_test_slide(folder / f"s{seed}.tif", 1536, 1536, seed=seed)
    out = ws.path.parent / "scored"
    env = {**ws.env, "SBATCH_MEM_PER_NODE": "1500M"}
    command = [ws.path / "slurm" / "submit.sh", "slides", folder, "--out", out, "--per-task", "3"]
    array, cohort = run(command, ws.path, env).stdout.split()
    log = ws.log(f"pcam-slides-{array}_0.out")
    wait_for_line(log, r"Patch path", 300, ws.cluster, array)  # inside WSInfer's inference
    run(["scancel", "--signal=USR1", "--batch", f"{array}_0"], env=ws.env)
    record = ws.cluster.wait(cohort, timeout=600)
    text = log.read_text()
    assert record.state == "COMPLETED", job_log(ws, "pcam-slides-cohort", cohort)
    assert "preempted: stopped before" in text and "requeueing" in text, text
    assert "restart 1" in text and "task 0 done" in text
    rows = json.loads((out / "cohort.json").read_text())
    assert [r["status"] for r in rows] == ["done"] * 3
