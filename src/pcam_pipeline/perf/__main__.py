"""Performance measurements beside the pipeline (the benchmark stage runs none of them):

    python -m pcam_pipeline.perf [--out F] full [--patches N] [--dir D] [--keep] [--input D]
    python -m pcam_pipeline.perf [--out F] layout [--patches N] [--chunks 16,64,...]
    python -m pcam_pipeline.perf [--out F] noop [--repo DIR] [--repeats N]
    python -m pcam_pipeline.perf [--out F] repro-full [--patches N] [--dir D] [--baseline T]

- `full`: validate, preprocess and the streaming loader on a PCAM-sized split (262,144 train
  patches, 7.25 GB, written under --dir and removed afterwards), each against the raw read of
  the same bytes (`full_size.py`).
- `layout`: the preprocess HDF5 layout choice (chunk size in patches x none/lzf/gzip): write
  time, file size, block-read and streaming-loader throughput, as a table (`layout.py`).
- `noop`: median time of a no-op `dvc repro` (everything cached) against `dvc status`
  (`noop.py`).
- `repro-full`: fetch (`fetch.source: path`), validate and preprocess under `dvc repro` on a
  PCAM-sized split, with DVC's default configuration (or each `--baseline` tree, an earlier
  commit's export; repeatable) and then this tree: each stage's own time beside DVC's
  bookkeeping, and the disk used, against `md5sum` and `cp` of the same files
  (`repro_full.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pcam_pipeline.bench.measure import PCAM_TRAIN_PATCHES
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import load_params
from pcam_pipeline.paths import PARAMS_FILE
from pcam_pipeline.perf.chunking import format_layout, layout_table
from pcam_pipeline.perf.full_size import FULL_DIR, full_size
from pcam_pipeline.perf.noop import noop_ratio
from pcam_pipeline.perf.repro_full import repro_full


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
    full.add_argument("--patches", type=int, default=PCAM_TRAIN_PATCHES, help="train patches")
    full.add_argument("--dir", type=Path, default=FULL_DIR, help="work directory")
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
    repro = commands.add_parser("repro-full", help="data stages under dvc repro, full size")
    repro.add_argument("--patches", type=int, default=PCAM_TRAIN_PATCHES, help="train patches")
    repro.add_argument("--dir", type=Path, default=FULL_DIR, help="work directory")
    repro.add_argument(
        "--baseline",
        type=Path,
        action="append",
        help="compare with this exported tree (`git archive` of src, dvc.yaml, .dvc, params.yaml),"
        " labelled by its directory's name; repeat for several",
    )
    return parser


def measure(args: argparse.Namespace) -> Any:
    if args.command == "noop":
        return noop_ratio(args.repo.resolve(), args.repeats)
    params = load_params(args.params)
    if args.command == "full":
        return full_size(params, args.patches, args.dir, args.keep, args.input)
    if args.command == "repro-full":
        return repro_full(params, args.patches, args.dir, args.baseline)
    rows = layout_table(
        args.patches,
        [int(c) for c in args.chunks.split(",")],
        args.compression.split(","),
        args.block or params.loader.block_patches,
        params.train.batch_size,
        args.repeats,
    )
    print(format_layout(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = measure(args)
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
