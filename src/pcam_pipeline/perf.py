"""Performance measurements beyond the default benchmark stage.

    python -m pcam_pipeline.perf full    [--patches N] [--dir D] [--keep] [--out F]
    python -m pcam_pipeline.perf layout  [--patches N] [--chunks 16,64,...] [--out F]
    python -m pcam_pipeline.perf noop    [--repo DIR] [--repeats N] [--out F]

- `full` (also run by the benchmark stage when `benchmark.full: true`): writes a PCAM-sized,
  PCAM-format train split (262,144 patches, 7.25 GB; tiled from the synthetic generator, each
  patch made unique) plus small valid/test splits under `benchmark.full_dir`, then times the
  raw read of the train file (cold: evicted from the page cache; warm: the best block size)
  and its raw copy (read + write), the validate stage's work from a cold and a warm page cache
  and the preprocess stage's (each in a child process, for its own peak RSS), and our
  streaming loader on the preprocessed result. Everything it wrote is removed afterwards.
- `layout`: the preprocess HDF5 layout choice (chunk size in patches x none/lzf/gzip): write
  time, file size, block-read and streaming-loader throughput, as a table.
- `noop`: median time of a no-op `dvc repro` (everything cached) against `dvc status`.
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
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pcam_pipeline.data.hdf5 import PatchBlocks, ProcessedLayout, ProcessedWriter, blocks
from pcam_pipeline.data.pcam import LABEL_SHAPE, PATCH_SHAPE, SPLITS, split_files
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.measure import loader_epoch, median, peak_rss_mb
from pcam_pipeline.params import Params, load_params, parse_params
from pcam_pipeline.paths import PARAMS_FILE, PROCESSED_DIR

log = logging.getLogger(__name__)
PATCH_BYTES = int(np.prod(PATCH_SHAPE))
BASE_PATCHES = 2048  # distinct synthetic patches the full-size train split is tiled from
FULL_OTHER_SPLITS = 1024  # valid and test patches in the full-size run
CHILD_MARK = "PCAM-PERF-RESULT "


class PerfError(PipelineError):
    """A measurement cannot run as asked (no disk space, pipeline not cached, ...)."""


# ---------------------------------------------------------------------------------------------
# Reading helpers


def evict(path: Path) -> bool:
    """Drop one file's pages from the page cache (only that file's; needs clean pages)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_seconds(path: Path, block: int, key: str = "x") -> tuple[float, int, bool]:
    """Seconds to read every row of `key` in consecutive blocks into one reused buffer."""
    with PatchBlocks(path, key) as reader:
        buffer = np.empty((block, *reader.row_shape), dtype=reader.dtype)
        start = time.perf_counter()
        for part in blocks(reader.length, block):
            reader.read_into(buffer, part.start, part.stop)
        return time.perf_counter() - start, reader.length, reader.direct


def copy_seconds(path: Path, target: Path, block: int, key: str = "x") -> tuple[float, int]:
    """Seconds to read every row of `key` in blocks and write the bytes to a new file `target`:
    the least I/O a stage that writes its input back out must do (not synced: nor are stages)."""
    with PatchBlocks(path, key) as reader:
        buffer = np.empty((block, *reader.row_shape), dtype=reader.dtype)
        start = time.perf_counter()
        with open(target, "wb") as out:
            for part in blocks(reader.length, block):
                out.write(memoryview(reader.read_into(buffer, part.start, part.stop)).cast("B"))
        seconds = time.perf_counter() - start
    target.unlink()
    return seconds, reader.length


RAW_READ_BLOCKS = (256, 1024)  # the raw read's upper bound: the faster of these block sizes


# ---------------------------------------------------------------------------------------------
# Child processes: one measured job each, so each has its own peak RSS


def _child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    import psutil

    params = parse_params(spec["params"], "perf child")
    if kind == "validate":
        from pcam_pipeline.data.validation import validate_dir

        baseline = psutil.Process().memory_info().rss
        start = time.perf_counter()
        report = validate_dir(Path(spec["pcam_dir"]), params.validate_)
        seconds = time.perf_counter() - start
        extra = {"ok": report["ok"], "errors": report["errors"], "warnings": report["warnings"]}
    elif kind == "preprocess":
        from pcam_pipeline.data.prepare import write_processed

        baseline = psutil.Process().memory_info().rss
        start = time.perf_counter()
        dataset = ProcessedData(Path(spec["out_dir"]))
        report = write_processed(
            dataset, Path(spec["pcam_dir"]), params.preprocess, params.validate_
        )
        seconds = time.perf_counter() - start
        extra = {"n_out": sum(split["n_out"] for split in report.values())}
    elif kind == "loader":
        from pcam_pipeline.data.loader import Split

        options = params.loader.model_copy(update={"in_memory": False})
        baseline = psutil.Process().memory_info().rss
        start = time.perf_counter()
        seen = loader_epoch(Split.open(Path(spec["path"]), options), params.train.batch_size, 0)
        seconds = time.perf_counter() - start
        extra = {"patches": seen}
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    peak = peak_rss_mb()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "working_memory_mb": peak - (baseline / 2**20),  # both in MB
        **extra,
    }


def run_child(kind: str, spec: dict[str, Any], evict_first: Path | None = None) -> dict[str, Any]:
    """Run one measured job in a fresh interpreter; `evict_first`: drop that file from the page
    cache just before (the job then reads it cold)."""
    if evict_first is not None:
        evict(evict_first)
    result = subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.perf", "_child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in result.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line.removeprefix(CHILD_MARK))
    raise PerfError(
        f"perf child '{kind}' failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
    )


# ---------------------------------------------------------------------------------------------
# Full size


def write_full_pcam(directory: Path, params: Params, patches: int) -> dict[str, Any]:
    """PCAM-format files: a `patches`-patch train split and small valid/test splits.

    Train is tiled from BASE_PATCHES synthetic patches in blocks; each copy gets its index
    written into its top-left pixel, so every patch is distinct (as in PCAM) and validate's
    duplicate and leakage checks do their full work. Memory stays at a few blocks.
    """
    from pcam_pipeline.data.hdf5 import write_pcam_split
    from pcam_pipeline.data.synthetic import generate_split

    fetch = params.fetch
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for split in ("valid", "test"):
        x, y = generate_split(fetch.seed, split, FULL_OTHER_SPLITS, fetch.positive_fraction)
        write_pcam_split(directory, split, x, y)
    base_x, base_y = generate_split(fetch.seed, "train", BASE_PATCHES, fetch.positive_fraction)
    x_path, y_path = split_files(directory, "train")
    block = 8192
    with h5py.File(x_path, "w") as handle:
        x = handle.create_dataset("x", shape=(patches, *PATCH_SHAPE), dtype="uint8")
        for part in blocks(patches, block):
            index = np.arange(part.start, part.stop)
            tile = np.take(base_x, index % BASE_PATCHES, axis=0)
            for channel in range(3):
                tile[:, 0, 0, channel] = (index >> (8 * channel)) & 0xFF
            x[part] = tile
    labels = np.resize(base_y, patches).astype(np.uint8)
    with h5py.File(y_path, "w") as handle:
        handle.create_dataset("y", data=labels.reshape(-1, *LABEL_SHAPE))
    return {
        "generate_seconds": time.perf_counter() - start,
        "train_patches": patches,
        "other_split_patches": 2 * FULL_OTHER_SPLITS,
    }


def check_disk(directory: Path, needed: int) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise PerfError(
            f"the full-size benchmark needs {needed / 1e9:.1f} GB free under {directory} "
            f"(PCAM-format input + preprocessed output), but {probe} has {free / 1e9:.1f} GB; "
            "set benchmark.full_dir to a roomier place (e.g. node-local $TMPDIR) or lower "
            "benchmark.full_patches"
        )


def split_lengths(directory: Path) -> dict[str, int]:
    lengths = {}
    for split in SPLITS:
        with h5py.File(split_files(directory, split)[1], "r") as handle:
            lengths[split] = int(handle["y"].shape[0])
    return lengths


def full_size(
    params: Params,
    patches: int | None = None,
    directory: Path | None = None,
    keep: bool = False,
    source: Path | None = None,
) -> dict[str, Any]:
    """Validate, preprocess and stream a PCAM-sized split; compare each with the raw read.

    `source`: an existing PCAM-format directory (e.g. data/raw with the real files) to measure
    instead of generating one; it is only read.
    """
    bp = params.benchmark
    root = Path(directory or bp.full_dir)
    if source is None:
        patches = patches or bp.full_patches
        total = patches + 2 * FULL_OTHER_SPLITS
        check_disk(root, int(2.1 * total * PATCH_BYTES))
    else:
        total = sum(split_lengths(source).values())
        check_disk(root, int(1.1 * total * PATCH_BYTES))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    spec_params = params.as_dict()
    try:
        out_dir = work / "processed"
        if source is None:
            pcam_dir = work / "pcam"
            log.info("full-size benchmark: writing %d patches under %s", total, work)
            result: dict[str, Any] = write_full_pcam(pcam_dir, params, patches or 0)
        else:
            pcam_dir = source
            lengths = split_lengths(source)
            result = {
                "source": str(source),
                "train_patches": lengths["train"],
                "other_split_patches": lengths["valid"] + lengths["test"],
            }
        train_x = split_files(pcam_dir, "train")[0]
        block = params.validate_.block_patches
        evicted = evict(train_x)
        seconds, n, _ = read_seconds(train_x, block)
        result["raw_cold_img_s"] = n / seconds if evicted else None
        warm = {
            size: n / median([read_seconds(train_x, size)[0] for _ in range(3)])
            for size in sorted({block, *RAW_READ_BLOCKS})
        }
        result["raw_warm_by_block_img_s"] = {str(size): rate for size, rate in warm.items()}
        result["raw_warm_img_s"] = max(warm.values())
        result["raw_warm_gb_s"] = result["raw_warm_img_s"] * PATCH_BYTES / 1e9
        # Writing 7 GB meets the kernel's dirty-page throttling, which differs from one run to
        # the next: copy before and after preprocess, and compare with the faster copy.
        copy_block = params.preprocess.block_patches
        os.sync()  # each writer starts with no one else's dirty pages to flush
        copy = [copy_seconds(train_x, work / "copy.bin", copy_block)[0]]

        spec = {"params": spec_params, "pcam_dir": str(pcam_dir)}
        log.info("full-size benchmark: validate, from a cold page cache and a warm one")
        validate_cold = run_child("validate", spec, evict_first=train_x if evicted else None)
        warm_runs = [run_child("validate", spec) for _ in range(3)]
        validate = max(warm_runs, key=lambda run: run["peak_rss_mb"])  # memory: the worst
        validate["img_s"] = median([total / run["seconds"] for run in warm_runs])
        validate["repeats"] = len(warm_runs)
        if evicted:
            validate["cold_img_s"] = total / validate_cold["seconds"]
        log.info("full-size benchmark: preprocess")
        os.sync()
        preprocess = run_child("preprocess", {**spec, "out_dir": str(out_dir)})
        preprocess["img_s"] = total / preprocess["seconds"]
        os.sync()
        copy.append(copy_seconds(train_x, work / "copy.bin", copy_block)[0])
        result["raw_copy_runs_img_s"] = [n / seconds for seconds in copy]
        result["raw_copy_img_s"] = n / min(copy)
        preprocess["fraction_of_raw_copy"] = preprocess["img_s"] / result["raw_copy_img_s"]
        processed_train = ProcessedData(out_dir).split_path("train")
        log.info("full-size benchmark: streaming loader")
        # Interleaved with the raw read of the same file, so both see the same page cache.
        raw_rates, runs = [], []
        for _ in range(3):
            seconds, rows, _ = read_seconds(processed_train, params.loader.block_patches)
            raw_rates.append(rows / seconds)
            runs.append(run_child("loader", {"params": spec_params, "path": str(processed_train)}))
        loader = max(runs, key=lambda run: run["peak_rss_mb"])  # the memory figures: the worst
        loader["img_s"] = median([run["patches"] / run["seconds"] for run in runs])
        loader["raw_read_img_s"] = median(raw_rates)
        loader["fraction_of_raw"] = loader["img_s"] / loader["raw_read_img_s"]
        loader["repeats"] = len(runs)

        size_mb = train_x.stat().st_size / 2**20
        for name, stage in (("validate", validate), ("preprocess", preprocess)):
            stage["fraction_of_raw_warm"] = stage["img_s"] / result["raw_warm_img_s"]
            stage["peak_rss_over_train_size"] = stage["peak_rss_mb"] / size_mb
            result[name] = stage
        if result["raw_cold_img_s"] and "cold_img_s" in validate:
            validate["fraction_of_raw_cold"] = validate["cold_img_s"] / result["raw_cold_img_s"]
        result["loader_streaming"] = loader
        result["train_x_gb"] = train_x.stat().st_size / 1e9
        result["processed_train_gb"] = processed_train.stat().st_size / 1e9
        result["targets"] = {
            "validate_at_least_half_of_raw_read": validate["fraction_of_raw_warm"] >= 0.5,
            "preprocess_at_least_half_of_raw_read": preprocess["fraction_of_raw_warm"] >= 0.5,
            "preprocess_at_least_half_of_raw_copy": preprocess["fraction_of_raw_copy"] >= 0.5,
            "validate_peak_memory_within_2x_size": validate["peak_rss_over_train_size"] <= 2,
            "preprocess_peak_memory_within_2x_size": preprocess["peak_rss_over_train_size"] <= 2,
        }
        return result
    finally:
        if keep:
            log.info("full-size benchmark: kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if root.exists() and not any(root.iterdir()):
                root.rmdir()


# ---------------------------------------------------------------------------------------------
# HDF5 layout


def layout_source(patches: int) -> np.ndarray:
    """Up to 2048 distinct patches: the processed train split if present, else synthetic."""
    train = ProcessedData(PROCESSED_DIR).split_path("train")
    if train.exists():
        with h5py.File(train, "r") as handle:
            return handle["x"][: min(patches, 2048)]
    from pcam_pipeline.data.synthetic import generate_split

    return generate_split(2026, "train", min(patches, 2048), 0.5)[0]


def measure_layout(
    source: np.ndarray,
    patches: int,
    layout: ProcessedLayout,
    directory: Path,
    block: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    import torch

    from pcam_pipeline.data.loader import Split
    from pcam_pipeline.params import LoaderParams

    path = directory / f"layout-{layout.chunk_patches}-{layout.compression}.h5"
    start = time.perf_counter()
    with ProcessedWriter(path, layout) as writer:
        for part in blocks(patches, 1024):
            index = np.arange(part.start, part.stop)
            writer.append(
                np.take(source, index % len(source), axis=0), (index % 2).astype(np.uint8), index
            )
    write_seconds = time.perf_counter() - start
    options = LoaderParams(
        in_memory=False,
        max_memory_fraction=0.5,
        block_patches=block,
        num_workers=0,
        device_memory_fraction=0.0,
    )
    sequential, shuffled, loader = [], [], []
    n_blocks = -(-patches // block)
    for repeat in range(repeats):
        sequential.append(patches / read_seconds(path, block)[0])
        order = np.random.default_rng(repeat).permutation(n_blocks)
        with PatchBlocks(path) as reader:
            buffer = np.empty((block, *PATCH_SHAPE), dtype=np.uint8)
            start = time.perf_counter()
            for k in order:
                reader.read_into(buffer, k * block, min((k + 1) * block, patches))
            shuffled.append(patches / (time.perf_counter() - start))
        start = time.perf_counter()
        split = Split.open(path, options)
        seen = sum(
            len(x)
            for x, _ in split.batches(
                split.epoch_order(torch.Generator().manual_seed(repeat)), batch_size
            )
        )
        loader.append(seen / (time.perf_counter() - start))
    size = path.stat().st_size
    path.unlink()
    return {
        "chunk_patches": layout.chunk_patches,
        "compression": layout.compression,
        "chunk_mb": layout.chunk_patches * PATCH_BYTES / 2**20,
        "size_ratio": size / (patches * PATCH_BYTES),
        "write_img_s": patches / write_seconds,
        "sequential_read_img_s": median(sequential),
        "shuffled_block_read_img_s": median(shuffled),
        "loader_streaming_img_s": median(loader),
    }


def layout_table(
    patches: int,
    chunks: list[int],
    compressions: list[str],
    block: int,
    batch_size: int,
    repeats: int,
) -> list[dict[str, Any]]:
    source = layout_source(patches)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pcam-layout-") as directory:
        for compression in compressions:
            for chunk in chunks:
                log.info("layout: chunk %d, %s", chunk, compression)
                rows.append(
                    measure_layout(
                        source,
                        patches,
                        ProcessedLayout(chunk, compression),
                        Path(directory),
                        block,
                        batch_size,
                        repeats,
                    )
                )
    return rows


def format_layout(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| chunk (patches, MB) | compression | size vs raw | write img/s | "
        "block read img/s (sequential / shuffled) | streaming loader img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chunk_patches']} ({r['chunk_mb']:.1f}) | {r['compression']} | "
            f"{r['size_ratio']:.2f} | {r['write_img_s']:,.0f} | "
            f"{r['sequential_read_img_s']:,.0f} / {r['shuffled_block_read_img_s']:,.0f} | "
            f"{r['loader_streaming_img_s']:,.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# No-op dvc repro vs dvc status


def _dvc(repo: Path, *args: str) -> tuple[float, str]:
    executable = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [executable, *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise PerfError(
            f"`dvc {' '.join(args)}` failed in {repo} ({result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return seconds, result.stdout + result.stderr


def noop_ratio(repo: Path, repeats: int = 11) -> dict[str, Any]:
    """Median seconds of `dvc repro` with everything cached, over those of `dvc status`."""
    _, dry = _dvc(repo, "repro", "--dry")
    if "Running stage" in dry:
        raise PerfError(
            f"{repo}: `dvc repro` would run stages, so it is not a no-op; run `dvc repro` "
            f"there first:\n{dry[-2000:]}"
        )
    _dvc(repo, "status")  # warm-up: imports, file system caches
    _dvc(repo, "repro")
    status_s, repro_s = [], []
    for _ in range(repeats):
        seconds, _ = _dvc(repo, "status")
        status_s.append(seconds)
        seconds, output = _dvc(repo, "repro")
        if "Running stage" in output:
            raise PerfError(f"{repo}: `dvc repro` ran a stage, not a no-op:\n{output[-2000:]}")
        repro_s.append(seconds)
    ratio = median(repro_s) / median(status_s)
    return {
        "dvc_status_s": median(status_s),
        "dvc_repro_noop_s": median(repro_s),
        "ratio": ratio,
        "repeats": repeats,
        "target_at_most_1_5x": ratio <= 1.5,
        "status_samples_s": status_s,
        "repro_samples_s": repro_s,
    }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pcam_pipeline.perf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--out", type=Path, help="also write the result here as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    full = commands.add_parser("full", help="full-size validate/preprocess/loader figures")
    full.add_argument("--patches", type=int, help="train patches (default benchmark.full_patches)")
    full.add_argument("--dir", type=Path, help="work directory (default benchmark.full_dir)")
    full.add_argument("--keep", action="store_true", help="keep the generated files")
    full.add_argument(
        "--input", type=Path, help="measure this PCAM-format directory (e.g. data/raw) instead"
    )
    layout = commands.add_parser("layout", help="HDF5 chunk/compression table")
    layout.add_argument("--patches", type=int, default=20480)
    layout.add_argument("--chunks", default="16,64,256,512,1024")
    layout.add_argument("--compression", default="none,lzf,gzip")
    layout.add_argument("--block", type=int, help="block read (default loader.block_patches)")
    layout.add_argument("--repeats", type=int, default=3)
    noop = commands.add_parser("noop", help="no-op dvc repro vs dvc status")
    noop.add_argument("--repo", type=Path, default=Path("."))
    noop.add_argument("--repeats", type=int, default=11)
    child = commands.add_parser("_child")
    child.add_argument("kind")
    child.add_argument("spec")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "_child":
        print(CHILD_MARK + json.dumps(_child(args.kind, json.loads(args.spec))), flush=True)
        return 0
    try:
        if args.command == "noop":
            result: Any = noop_ratio(args.repo.resolve(), args.repeats)
        else:
            params = load_params(args.params)
            if args.command == "full":
                result = full_size(params, args.patches, args.dir, args.keep, args.input)
            else:
                result = layout_table(
                    args.patches,
                    [int(c) for c in args.chunks.split(",")],
                    args.compression.split(","),
                    args.block or params.loader.block_patches,
                    params.train.batch_size,
                    args.repeats,
                )
                print(format_layout(result))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
