"""The GPU check: what `pcam train` does with a GPU, on a PCAM-sized split, in a few minutes.

    python -m pcam_pipeline.gpucheck --out reports/gpu-check/gpu-check.json [--baseline DIR]

(`scripts/gpu-check.sh` runs it, then the `gpu` tests.) It writes a 262,144-patch PCAM-format
train split, runs the validate and preprocess stages' work on it, then times the training loop
end to end (the real loader feeding the real step) against the same step on resident data, per
batch size, precision and `train.compile` mode, and prints the table. `--baseline DIR`: a
checkout of an earlier version (its `src/` and `params.yaml`) whose `Trainer.train_epoch` is
timed the same way, in the same run, for a side-by-side ratio. The JSON is rewritten after
every measurement, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.prepare import write_processed
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.distributed import free_port
from pcam_pipeline.measure import PCAM_TRAIN_PATCHES, time_training_loop
from pcam_pipeline.params import Params, TrainParams, load_params
from pcam_pipeline.paths import PARAMS_FILE
from pcam_pipeline.repro import seed_everything, write_json

log = logging.getLogger(__name__)

# (batch size, precision, compile mode): the table, then the compiled step.
CONFIGS: tuple[tuple[int, str, str], ...] = (
    (64, "bf16", "off"),
    (256, "bf16", "off"),
    (1024, "bf16", "off"),
    (64, "fp32", "off"),
    (64, "bf16", "reduce-overhead"),
    (256, "bf16", "reduce-overhead"),
    (1024, "bf16", "reduce-overhead"),
)
BASELINE_BATCHES = (64, 256, 1024)
# DistributedDataParallel on one GPU (a process group of one) against the plain loop above.
DDP_CONFIGS: tuple[tuple[int, str, str], ...] = (
    (64, "bf16", "off"),
    (256, "bf16", "off"),
    (1024, "bf16", "off"),
)


def gpu_environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0),
        "cpu_count": os.cpu_count(),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        driver, memory = (part.strip() for part in smi.stdout.splitlines()[0].split(","))
        env.update(driver=driver, gpu_memory=memory)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        env["driver"] = None
    return env


def prepare_data(params: Params, root: Path, patches: int) -> dict[str, Any]:
    """PCAM-format files, validated and preprocessed as the stages do; their timings."""
    from pcam_pipeline.data.validation import validate_dir
    from pcam_pipeline.perf import write_full_pcam

    pcam_dir, processed = root / "pcam", root / "processed"
    result = write_full_pcam(pcam_dir, params, patches)
    start = time.perf_counter()
    report = validate_dir(pcam_dir, params.validate_)
    result["validate_s"] = time.perf_counter() - start
    result["validate_ok"] = report["ok"]
    start = time.perf_counter()
    write_processed(ProcessedData(processed), pcam_dir, params.preprocess, params.validate_)
    result["preprocess_s"] = time.perf_counter() - start
    shutil.rmtree(pcam_dir)
    return result


def cuda_train_params(
    params: Params, batch_size: int, precision: str, compile_mode: str
) -> TrainParams:
    """params.train for one row of the table: on CUDA, at this batch size, precision, compile."""
    return params.train.model_copy(
        update={
            "batch_size": batch_size,
            "bf16": precision == "bf16",
            "compile": compile_mode,
            "device": "cuda",
        }
    )


def time_loops(
    params: Params,
    processed: Path,
    budget_s: float,
    record: Any,
    configs: tuple[tuple[int, str, str], ...] = CONFIGS,
    ddp_too: bool = True,
) -> None:
    device = torch.device("cuda")
    dataset = ProcessedData(processed)
    split = Split.open(dataset.split_path("train"), params.loader)
    mean, std = dataset.normalisation(device)
    start = time.perf_counter()
    feeder = DeviceBatches(split, device, params.loader)
    torch.cuda.synchronize()
    record("feeder", {"mode": feeder.mode, "to_device_s": time.perf_counter() - start})
    rows = []
    for batch_size, precision, compile_mode in configs:
        train = cuda_train_params(params, batch_size, precision, compile_mode)
        try:
            row = time_training_loop(train, params.loader, feeder, mean, std, 20, budget_s)
        except Exception as error:  # one failing configuration must not hide the others
            row = {"batch_size": batch_size, "precision": precision, "compile": compile_mode}
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        log.info("%s", row)
        rows.append(row)
        record("loop", rows)
    if not ddp_too:
        return
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        ddp_rows = []
        for batch_size, precision, compile_mode in DDP_CONFIGS:
            train = cuda_train_params(params, batch_size, precision, compile_mode)
            row = time_training_loop(
                train, params.loader, feeder, mean, std, 20, budget_s, ddp=True
            )
            log.info("%s", row)
            ddp_rows.append(row)
            record("ddp_one_gpu", ddp_rows)
    finally:
        dist.destroy_process_group()


BASELINE_SCRIPT = r"""
import json, os, sys, time, signal
import torch
from pcam_pipeline.params import load_params
from pcam_pipeline.stages import train as stage
from pcam_pipeline.preemption import Preempted

params = load_params(__import__("pathlib").Path(sys.argv[1]))
rows = []
for batch_size in json.loads(sys.argv[2]):
    warm, steps = 20, int(sys.argv[3])
    p = params.model_copy(update={"train": params.train.model_copy(
        update={"batch_size": batch_size, "device": "cuda", "bf16": True})})

    class Stop:
        calls, started, ended = 0, None, None

        @property
        def signal(self):
            if self.ended is not None:
                return signal.SIGUSR1
            self.calls += 1
            if self.calls == warm:
                torch.cuda.synchronize(); self.started = time.perf_counter()
            if self.calls == warm + steps:
                torch.cuda.synchronize(); self.ended = time.perf_counter()
                return signal.SIGUSR1
            return None

    trainer = stage.Trainer(p)
    stop = Stop()
    try:
        trainer.train_epoch(stop)
    except Preempted:
        pass
    rows.append({"batch_size": batch_size,
                 "img_s": steps * batch_size / (stop.ended - stop.started)})
    print("BASELINE " + json.dumps(rows[-1]), flush=True)
print("BASELINE-ALL " + json.dumps(rows), flush=True)
"""


def time_baseline(
    baseline: Path, processed: Path, work: Path, steps: int = 200
) -> list[dict[str, Any]]:
    """The earlier version's `Trainer.train_epoch` (bf16), as a user ran it, in a subprocess."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{baseline / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PCAM_TRAIN_DATA_DIR": str(processed),
    }
    run_dir = work / "baseline-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BASELINE_SCRIPT,
            str(baseline / "params.yaml"),
            json.dumps(BASELINE_BATCHES),
            str(steps),
        ],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    for line in result.stdout.splitlines():
        if line.startswith("BASELINE-ALL "):
            return list(json.loads(line.removeprefix("BASELINE-ALL ")))
    raise RuntimeError(f"baseline run failed ({result.returncode}): {result.stderr[-3000:]}")


def table(result: dict[str, Any]) -> str:
    baseline = {row["batch_size"]: row["img_s"] for row in result.get("baseline", [])}
    lines = [
        "| batch, precision, compile | end to end img/s | resident img/s | fed | PCAM epoch s "
        "| before this change, end to end |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.get("loop", []):
        name = f"{row['batch_size']}, {row['precision']}, {row['compile']}"
        if "end_to_end_img_s" not in row:
            lines.append(f"| {name} | {row.get('error', 'out of memory')} | | | | |")
            continue
        before = baseline.get(row["batch_size"]) if row["compile"] == "off" else None
        before_text = "" if before is None or row["precision"] != "bf16" else f"{before:,.0f}"
        lines.append(
            f"| {name} | {row['end_to_end_img_s']:,.0f} | {row['resident_img_s']:,.0f} "
            f"| {row['fed_fraction']:.2f} | {row['pcam_epoch_s']:.2f} | {before_text} |"
        )
    plain = {
        row["batch_size"]: row["end_to_end_img_s"]
        for row in result.get("loop", [])
        if row.get("compile") == "off"
        and row.get("precision") == "bf16"
        and "end_to_end_img_s" in row
    }
    if result.get("ddp_one_gpu"):
        lines += [
            "",
            "| batch, bf16 | DDP on one GPU img/s | plain img/s | DDP / plain |",
            "|---|---|---|---|",
        ]
        for row in result["ddp_one_gpu"]:
            if "end_to_end_img_s" not in row or row["batch_size"] not in plain:
                continue
            base = plain[row["batch_size"]]
            lines.append(
                f"| {row['batch_size']} | {row['end_to_end_img_s']:,.0f} | {base:,.0f} "
                f"| {row['end_to_end_img_s'] / base:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcam_pipeline.gpucheck", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--out", type=Path, required=True, help="JSON written as it goes")
    parser.add_argument("--patches", type=int, default=PCAM_TRAIN_PATCHES)
    parser.add_argument("--budget", type=float, default=4.0, help="timed seconds per row")
    parser.add_argument("--baseline", type=Path, help="an earlier checkout to time beside")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument(
        "--configs",
        help="rows to time, e.g. 64:bf16:off,1024:bf16:reduce-overhead (default: the full table)",
    )
    parser.add_argument("--no-ddp", action="store_true", help="skip DDP on one GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA device; none is visible", file=sys.stderr)
        return 1
    params = load_params(args.params)
    seed_everything(params.train.seed)
    result: dict[str, Any] = {"environment": gpu_environment(), "patches": args.patches}

    def record(key: str, value: Any) -> None:
        result[key] = value
        write_json(args.out, result)

    record("environment", result["environment"])
    work = Path(tempfile.mkdtemp(prefix="pcam-gpu-check-", dir=args.dir))
    try:
        started = time.perf_counter()
        record("data", prepare_data(params, work, args.patches))
        configs = CONFIGS
        if args.configs:
            configs = tuple(
                (int(size), precision, mode)
                for size, precision, mode in (item.split(":") for item in args.configs.split(","))
            )
        time_loops(params, work / "processed", args.budget, record, configs, not args.no_ddp)
        if args.baseline is not None:
            try:
                record("baseline", time_baseline(args.baseline, work / "processed", work))
            except (RuntimeError, subprocess.SubprocessError) as error:
                record("baseline_error", str(error)[-3000:])
        record("seconds", time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["environment"]))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
