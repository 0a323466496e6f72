"""`pcam <stage>`: load params.yaml, call one stage's main. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from pcam_pipeline import numerics
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import ParamsError, launched_params, load_params
from pcam_pipeline.paths import PARAMS_FILE, RAW_DIR
from pcam_pipeline.preemption import EXIT_PREEMPTED, Preempted

STAGES = ("fetch", "validate", "preprocess", "train", "evaluate", "benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcam", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        commands.add_parser(stage, help=f"run the {stage} stage (as dvc repro does)")
    download = commands.add_parser(
        "download", help="download the official PCAM files into data/raw (resumable, verified)"
    )
    download.add_argument("--dir", type=Path, default=RAW_DIR, help="target directory")
    weights = commands.add_parser("weights", help="pretrained weights for train.timm.pretrained")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch_weights = weights_commands.add_parser(
        "download", help="a timm model's weights from the Hugging Face hub into weights/"
    )
    fetch_weights.add_argument("tag", help="timm's pretrained name, e.g. resnet18.a1_in1k")
    predict = commands.add_parser("predict", help="score patches with a checkpoint")
    predict.add_argument("checkpoint", type=Path)
    predict.add_argument("inputs", type=Path, nargs="+", help="an HDF5 file (key x) or PNG files")
    predict.add_argument("--out", type=Path, required=True, help="CSV of per-patch probabilities")
    predict.add_argument("--threshold", type=float, help="also write a 0/1 prediction")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    predict.add_argument(
        "--tta",
        default="none",
        choices=["none", "flips", "d8"],
        help="mean probability over the square's symmetries (as evaluate.tta; none by default)",
    )
    report = commands.add_parser(
        "report", help="compare against a base revision offline: reports/compare/report.md"
    )
    report.add_argument("base", nargs="?", default="HEAD", help="base revision (default HEAD)")
    report.add_argument("--rev", help="the revision to compare (default: the workspace)")
    report.add_argument("--out", type=Path, help="directory (default reports/compare)")
    report.add_argument("--format", default="png", choices=["png", "svg"], help="plot images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        # Every stage's imports (torch, NumPy) come after the pin: the libraries read it on load.
        if args.command == "predict":
            numerics.pin("portable")
            from pcam_pipeline import predict

            predict.main(
                args.checkpoint, args.inputs, args.out, args.threshold, args.device, tta=args.tta
            )
            return 0
        if args.command == "weights":
            from pcam_pipeline import weights

            weights.main(args.tag)
            return 0
        if args.command == "report":
            from pcam_pipeline.review import report

            report.main(args.base, args.rev, args.out, args.format)
            return 0
        # A training worker trains with its launcher's params, not with a file's.
        params = launched_params(os.environ) or load_params(args.params)
        numerics.pin(params.cpu.numerics)
        if args.command == "download":
            from pcam_pipeline.stages import fetch

            fetch.download(params.fetch, args.dir)
            return 0
        stage = importlib.import_module(f"pcam_pipeline.stages.{args.command}")
        stage.main(params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
