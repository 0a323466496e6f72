"""The GPU loop benchmark: what `pcam train` does with a GPU, on a PCAM-sized split, in minutes.

    python -m pcam_pipeline.perf.gpu_loop --out reports/gpu-check/gpu-check.json [--baseline DIR]

(`scripts/gpu-check.sh` runs it, then the `gpu` tests.) It writes a 262,144-patch PCAM-format
train split, runs the validate and preprocess work on it, then times the training loop end to
end (the real loader feeding the real step) against the same step on resident data, per batch
size, precision and `train.compile` mode, and prints the table. `--baseline DIR`: a checkout of
an earlier version (its `src/` and `params.yaml`) whose `Trainer.train_epoch` is timed the same
way, in the same run, for a side-by-side ratio (`baseline_epoch.py`). `--mig-cap [GIB]` stands
in for the course's MIG 1g.5gb slice instead: the process capped at 4.75 GiB, the default CNN and
timm resnet18 at the course's batch sizes, eager and compiled, each row with whether it fits, img/s
and peak memory. The JSON is rewritten after every measurement, so a run cut short still leaves
what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline.bench.environment import environment
from pcam_pipeline.bench.measure import PCAM_TRAIN_PATCHES
from pcam_pipeline.bench.timing import time_loop
from pcam_pipeline.data.loader import DeviceBatches, Split
from pcam_pipeline.data.prepare import write_processed
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.data.validation import validate_dir
from pcam_pipeline.params import Params, TrainParams, load_params
from pcam_pipeline.paths import PARAMS_FILE
from pcam_pipeline.perf.full_size import write_full_pcam
from pcam_pipeline.repro import seed_everything, write_json
from pcam_pipeline.train.distributed import free_port

log = logging.getLogger(__name__)
Config = tuple[int, str, str]  # batch size, precision, compile mode
Record = Callable[[str, Any], None]  # adds a result to the JSON, which is rewritten

# The table, then the compiled step.
CONFIGS: tuple[Config, ...] = (
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
DDP_CONFIGS: tuple[Config, ...] = ((64, "bf16", "off"), (256, "bf16", "off"), (1024, "bf16", "off"))
# timm architectures at batch 256 in bf16, eager and compiled (CUDA graphs).
TIMM_MODELS = ("resnet18", "resnet50")
TIMM_CONFIGS: tuple[Config, ...] = ((256, "bf16", "off"), (256, "bf16", "reduce-overhead"))
WARMUP_STEPS = 20
# A stand-in for the course's MIG 1g.5gb slice (`--mig-cap`): the process capped at 4.75 GiB (the
# slice's memory less CUDA's context) with torch.cuda.set_per_process_memory_fraction, the default
# CNN and timm resnet18 at the course's batch sizes, eager and compiled. A cap is not a slice: the
# GPU keeps all its SMs, so the img/s are the whole GPU's; what fits and the peak memory carry over.
MIG_CAP_GIB = 4.75
MIG_BATCHES = (1, 64, 256, 1024)
MIG_CONFIGS: tuple[Config, ...] = tuple(
    (batch, "bf16", mode) for mode in ("off", "reduce-overhead") for batch in MIG_BATCHES
)
GIB = 1024**3
BASELINE_RUNNER = Path(__file__).with_name("baseline_epoch.py")


def prepare_data(params: Params, root: Path, patches: int) -> dict[str, Any]:
    """PCAM-format files, validated and preprocessed as the stages do; their timings."""
    pcam_dir = root / "pcam"
    result = write_full_pcam(pcam_dir, params, patches)
    start = time.perf_counter()
    report = validate_dir(pcam_dir, params.validate_)
    result["validate_s"] = time.perf_counter() - start
    result["validate_ok"] = report["ok"]
    start = time.perf_counter()
    write_processed(
        ProcessedData(root / "processed"), pcam_dir, params.preprocess, params.validate_
    )
    result["preprocess_s"] = time.perf_counter() - start
    shutil.rmtree(pcam_dir)
    return result


def cuda_train_params(params: Params, config: Config, timm_name: str | None = None) -> TrainParams:
    """params.train for one row of the table: on CUDA, at this batch size, precision, compile;
    with `timm_name`, that timm architecture (randomly initialised) in place of train.model."""
    batch_size, precision, compile_mode = config
    update: dict[str, Any] = {
        "batch_size": batch_size,
        "bf16": precision == "bf16",
        "compile": compile_mode,
        "device": "cuda",
    }
    if timm_name is not None:
        timm = params.train.timm.model_copy(update={"name": timm_name, "pretrained": None})
        update.update(model="timm", timm=timm)
    return params.train.model_copy(update=update)


class GpuLoops:
    """The training loop on CUDA, fed from the processed train split, one config at a time."""

    def __init__(
        self,
        params: Params,
        processed: Path,
        budget_s: float,
        record: Record,
        cap_bytes: int | None = None,
    ) -> None:
        device = torch.device("cuda")
        if cap_bytes is not None:
            params = capped_loader(params, cap_bytes, *torch.cuda.mem_get_info(device))
        self.params, self.budget_s, self.record = params, budget_s, record
        dataset = ProcessedData(processed)
        split = Split.open(dataset.split_path("train"), params.loader)
        self.mean, self.std = dataset.normalisation(device)
        start = time.perf_counter()
        self.feeder = DeviceBatches(split, device, params.loader)
        torch.cuda.synchronize()
        record("feeder", {"mode": self.feeder.mode, "to_device_s": time.perf_counter() - start})

    def time(
        self, config: Config, ddp: bool = False, timm_name: str | None = None
    ) -> dict[str, Any]:
        train = cuda_train_params(self.params, config, timm_name)
        feed = (self.feeder, self.mean, self.std)
        row = time_loop(train, self.params.loader, *feed, WARMUP_STEPS, self.budget_s, ddp=ddp)
        log.info("%s", row)
        return row

    def table(
        self, configs: tuple[Config, ...], key: str = "loop", timm_name: str | None = None
    ) -> None:
        """Time each config into result[key] (with `timm_name`: that architecture's rows)."""
        rows = []
        for config in configs:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                row = self.time(config, timm_name=timm_name)
            except Exception as error:  # one failing configuration must not hide the others
                batch_size, precision, compile_mode = config
                row = {"batch_size": batch_size, "precision": precision, "compile": compile_mode}
                row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            row = with_fit(row, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            rows.append(row)
            self.record(key, rows)

    def slice_tables(self) -> None:
        """The course's slice (`--mig-cap`): the default model and timm resnet18."""
        self.table(MIG_CONFIGS, "slice_cnn")
        self.table(MIG_CONFIGS, "slice_resnet18", timm_name="resnet18")

    def timm_tables(self) -> None:
        for name in TIMM_MODELS:
            self.table(TIMM_CONFIGS, f"loop_{name}", timm_name=name)

    def ddp_table(self) -> None:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            rows = []
            for config in DDP_CONFIGS:
                rows.append(self.time(config, ddp=True))
                self.record("ddp_one_gpu", rows)
        finally:
            dist.destroy_process_group()


def capped_loader(params: Params, cap_bytes: int, free: int, total: int) -> Params:
    """params with loader.device_memory_fraction scaled so the loader's decision (hold the split
    on the GPU or prefetch it) is the one it makes on a device of `cap_bytes`: it reads the free
    memory of the whole GPU, which the per-process cap does not lower."""
    loader = params.loader
    available = max(min(cap_bytes, free), 0)
    fraction = loader.device_memory_fraction * available / max(free, 1)
    return params.model_copy(
        update={"loader": loader.model_copy(update={"device_memory_fraction": fraction})}
    )


def with_fit(row: dict[str, Any], peak_allocated: int, peak_reserved: int) -> dict[str, Any]:
    """A table row with whether the config fits (it ran, or failed for another reason than
    memory) and the peak memory it took, in GiB."""
    error = row.get("error", "")
    return {
        **row,
        "fits": not row.get("oom") and "out of memory" not in error.lower(),
        "peak_allocated_gib": round(peak_allocated / GIB, 3),
        "peak_reserved_gib": round(peak_reserved / GIB, 3),
    }


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
    batches = json.dumps(BASELINE_BATCHES)
    result = subprocess.run(
        [
            sys.executable,
            "-P",
            str(BASELINE_RUNNER),
            str(baseline / "params.yaml"),
            batches,
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


def loop_lines(result: dict[str, Any]) -> list[str]:
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
    return lines


def ddp_lines(result: dict[str, Any]) -> list[str]:
    plain = {
        row["batch_size"]: row["end_to_end_img_s"]
        for row in result.get("loop", [])
        if row.get("compile") == "off"
        and row.get("precision") == "bf16"
        and "end_to_end_img_s" in row
    }
    lines = [
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
    return lines


def table(result: dict[str, Any]) -> str:
    lines = loop_lines(result)
    for name in TIMM_MODELS:
        if result.get(f"loop_{name}"):
            lines += ["", f"timm {name}:", *loop_lines({"loop": result[f"loop_{name}"]})]
    if result.get("ddp_one_gpu"):
        lines += ["", *ddp_lines(result)]
    for key in ("slice_cnn", "slice_resnet18"):
        if result.get(key):
            lines += [
                "",
                f"{key} (capped at {result.get('memory_cap_gib')} GiB):",
                *slice_lines(result[key]),
            ]
    return "\n".join(lines)


def slice_lines(rows: list[dict[str, Any]]) -> list[str]:
    """batch, compile, fits, img/s and peak memory of the slice's rows."""
    lines = ["batch  compile          fits  img/s      peak GiB (reserved)"]
    for row in rows:
        rate = row.get("end_to_end_img_s")
        shown = f"{rate:,.0f}" if isinstance(rate, int | float) else "-"
        lines.append(
            f"{row['batch_size']:>5}  {row['compile']:<15}  {'yes' if row['fits'] else 'NO':<4}  "
            f"{shown:<9}  {row['peak_allocated_gib']:.2f} ({row['peak_reserved_gib']:.2f})"
        )
    return lines


def parse_configs(text: str | None) -> tuple[Config, ...]:
    """`64:bf16:off,1024:bf16:reduce-overhead` as configs; the full table when not given."""
    if not text:
        return CONFIGS
    items = (item.split(":") for item in text.split(","))
    return tuple((int(size), precision, mode) for size, precision, mode in items)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pcam_pipeline.perf.gpu_loop", description=__doc__
    )
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
    parser.add_argument(
        "--no-timm", action="store_true", help=f"skip the timm rows ({', '.join(TIMM_MODELS)})"
    )
    parser.add_argument(
        "--mig-cap",
        type=float,
        nargs="?",
        const=MIG_CAP_GIB,
        help=f"stand in for a MIG slice: cap the process at this many GiB (default "
        f"{MIG_CAP_GIB}) and time only the slice's rows (cnn and resnet18, batches "
        f"{', '.join(map(str, MIG_BATCHES))}, eager and compiled)",
    )
    return parser


def run(args: argparse.Namespace, params: Params, record: Record) -> None:
    work = Path(tempfile.mkdtemp(prefix="pcam-gpu-check-", dir=args.dir))
    try:
        started = time.perf_counter()
        record("data", prepare_data(params, work, args.patches))
        if args.mig_cap is not None:
            cap = int(args.mig_cap * GIB)
            loops = GpuLoops(params, work / "processed", args.budget, record, cap_bytes=cap)
            loops.slice_tables()
            record("seconds", time.perf_counter() - started)
            return
        loops = GpuLoops(params, work / "processed", args.budget, record)
        loops.table(parse_configs(args.configs))
        if not args.no_timm:
            loops.timm_tables()
        if not args.no_ddp:
            loops.ddp_table()
        if args.baseline is not None:
            try:
                record("baseline", time_baseline(args.baseline, work / "processed", work))
            except (RuntimeError, subprocess.SubprocessError) as error:
                record("baseline_error", str(error)[-3000:])
        record("seconds", time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        print("error: the GPU loop benchmark needs a CUDA device; none is visible", file=sys.stderr)
        return 1
    params = load_params(args.params)
    seed_everything(params.train.seed)
    result: dict[str, Any] = {"environment": environment(), "patches": args.patches}
    if args.mig_cap is not None:
        # Before anything is allocated: every later allocation beyond the cap is an OOM, as on
        # a slice of that size.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(args.mig_cap * GIB / total, 1.0))
        result["memory_cap_gib"] = args.mig_cap

    def record(key: str, value: Any) -> None:
        result[key] = value
        write_json(args.out, result)

    record("environment", result["environment"])
    run(args, params, record)
    print(json.dumps(result["environment"]))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
