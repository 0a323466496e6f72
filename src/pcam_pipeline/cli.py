"""`pcam <stage>`: load params.yaml, call one stage's main. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

import yaml

from pcam_pipeline import numerics
from pcam_pipeline.errors import EXIT_PREEMPTED, PipelineError, Preempted
from pcam_pipeline.params import ParamsError, launched_params, load_params, overridden
from pcam_pipeline.paths import (
    BEST_CHECKPOINT,
    DRIFT_DIR,
    DRIFT_PLOTS_DIR,
    EXPORT_DIR,
    PARAMS_FILE,
    RAW_DIR,
    RUNTIME_LOCK,
)

STAGES = (
    "fetch", "validate", "preprocess", "train", "evaluate", "export", "export_bench", "benchmark",
    "drift_reference",
)  # fmt: skip
EXPERIMENT_COMMANDS = ("seeds", "summarize", "search")


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
    slides = commands.add_parser(
        "slides", help="whole slides through WSInfer: summaries, heatmaps, GeoJSON, a cohort table"
    )
    slides.add_argument("source", type=Path, help="a directory of slides or a file listing them")
    slides.add_argument("--out", type=Path, required=True, help="results directory")
    slides.add_argument(
        "--model-dir", type=Path, default=EXPORT_DIR / "wsinfer", help="[models/export/wsinfer]"
    )
    slides.add_argument("--card", type=Path, help="model card with the threshold [its export's]")
    slides.add_argument("--threshold", type=float, help="instead of the model card's")
    slides.add_argument("--spacing-um-px", type=float, help="for slides whose files hold none")
    slides.add_argument("--batch-size", type=int, default=64, help="[64]")
    slides.add_argument(
        "--num-workers", type=int, default=0, help="patch-reading processes [0: in-process]"
    )
    slides.add_argument(
        "--threads", type=int, help="torch threads for the model [cores less readers less 1]"
    )
    slides.add_argument("--top-k", type=int, default=10, help="top-k mean probability [10]")
    slides.add_argument(
        "--no-speedup", action="store_true", help="skip WSInfer's TorchScript freeze/optimise"
    )
    slides.add_argument(
        "--chunk", type=int, nargs=2, metavar=("INDEX", "SIZE"), help="only slides INDEX*SIZE.."
    )
    slides.add_argument("--cohort-only", action="store_true", help="only the cohort table")
    drift = commands.add_parser(
        "drift", help="test patches against the model's drift reference; exit 3 on drift"
    )
    drift.add_argument(
        "input", type=Path,
        help="a PCAM-format HDF5 file, a folder of patches, or `pcam slides`' OUT/patches/SLIDE.h5 "
        "(read from the slide its summary names)",
    )  # fmt: skip
    drift.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    drift.add_argument("--reference", type=Path, default=DRIFT_DIR, help="[models/drift]")
    drift.add_argument(
        "--checkpoint", type=Path, default=BEST_CHECKPOINT,
        help="the reference's model, for the confidence and embedding tests [models/best.pt]",
    )  # fmt: skip
    drift.add_argument("--plots", type=Path, default=DRIFT_PLOTS_DIR, help="[reports/drift]")
    drift.add_argument(
        "--slide", type=Path, help="the slide of a patches/SLIDE.h5 INPUT [its summary's]"
    )
    bundle = commands.add_parser(
        "bundle", help="the exported model, its card and a stand-alone runner: DIR and DIR.tar.gz"
    )
    bundle.add_argument("dir", type=Path, help="the bundle directory to write")
    bundle.add_argument("--export-dir", type=Path, default=EXPORT_DIR, help="[models/export]")
    bundle.add_argument("--drift-dir", type=Path, default=DRIFT_DIR, help="[models/drift]")
    model_get = commands.add_parser(
        "model-get", help="a registered model version (GTO tag), fetched and md5-checked"
    )
    model_get.add_argument("tag", help="pcam-classifier@vX.Y.Z or pcam-classifier#STAGE#N")
    model_get.add_argument("--out", type=Path, default=Path("build/model"), help="[build/model]")
    data_report = commands.add_parser(
        "data-report", help="a data change: data params, validate and preprocess against BASE"
    )
    data_report.add_argument("base", nargs="?", default="HEAD", help="revision [HEAD]")
    data_report.add_argument("--out", type=Path, help="directory of data.md [reports/compare]")
    serve = commands.add_parser(
        "serve", help="the exported model over HTTP: Open Inference Protocol, a page, /metrics"
    )
    serve.add_argument("--host", help="[serve.host]; beyond loopback a token is required")
    serve.add_argument("--port", type=int, help="[serve.port]")
    serve.add_argument("--precision", choices=["fp32", "int8"], help="[serve.precision]")
    serve.add_argument("--export-dir", type=Path, default=EXPORT_DIR, help="[models/export]")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads [one a core]")
    serve.add_argument("--token-file", type=Path, help="bearer token file [else $PCAM_SERVE_TOKEN]")
    serve.add_argument(
        "--drift-reference", type=Path, help="drift reference [EXPORT_DIR/drift, ../drift]"
    )
    report = commands.add_parser(
        "report", help="compare against a base revision offline: reports/compare/report.md"
    )
    report.add_argument("base", nargs="?", default="HEAD", help="base revision (default HEAD)")
    report.add_argument("--rev", help="the revision to compare (default: the workspace)")
    report.add_argument("--out", type=Path, help="directory (default reports/compare)")
    report.add_argument("--format", default="png", choices=["png", "svg"], help="plot images")
    seeds = commands.add_parser("seeds", help="run the current params under N seeds (DVC exps)")
    seeds.add_argument("count", type=int, metavar="N")
    seeds.add_argument("--first", type=int, help="first seed [params.yaml's train.seed]")
    seeds.add_argument("--prefix", default="seeds", help="experiments are named PREFIX-s<seed>")
    summarize = commands.add_parser(
        "summarize", help="mean, std, 95%% interval of experiments grouped by params minus seed"
    )
    summarize.add_argument("-A", "--all-commits", action="store_true", help="every commit's")
    search = commands.add_parser(
        "search", help="an Optuna study of DVC experiments; `search apply-best STUDY`: its champion"
    )
    search.add_argument("study", nargs="+", metavar="[apply-best|report] STUDY_FILE")
    search.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a param every experiment also sets (e.g. train.device=cuda)",
    )  # fmt: skip
    search.add_argument("--workers", type=int, default=1, help="local worker processes")
    search.add_argument("--worker", help=argparse.SUPPRESS)  # one worker of a study, no report
    search.add_argument("--stale-after", type=float, default=120.0, help="s without a heartbeat")
    search.add_argument("--heartbeat", type=float, default=10.0, help="s between heartbeats")
    return parser


def run_experiments_command(args: argparse.Namespace) -> None:
    """seeds, summarize, search: tooling over DVC experiments (imported here: no stage's dep)."""
    if args.command == "summarize":
        from pcam_pipeline.experiments import summary

        summary.main(Path("."), args.all_commits)
        return
    if args.command == "seeds":
        from pcam_pipeline.experiments import seeds

        first = args.first if args.first is not None else load_params(args.params).train.seed
        seeds.main(args.count, first, args.prefix)
        return
    from pcam_pipeline.experiments import search, study

    verb, files = "run", args.study
    if files[0] in ("apply-best", "report"):
        verb, files = files[0], files[1:]
    if len(files) != 1:
        raise ParamsError("usage: pcam search [apply-best|report] STUDY_FILE (one study file)")
    load_params(args.params)  # a bad params.yaml is named before any trial
    spec = study.load_study(Path(files[0]), yaml.safe_load(args.params.read_text()))
    if verb == "apply-best":
        search.apply_best(spec)
    elif verb == "report":
        search.report(spec)
    else:
        fixed = study.parse_assignments(args.set)
        options = search.WorkerOptions(
            args.stale_after, args.heartbeat, fixed, os.environ.get("PCAM_COMMIT")
        )
        search.main(spec, Path(files[0]), Path("."), args.workers, args.worker, options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command in EXPERIMENT_COMMANDS:
            run_experiments_command(args)
            return 0
        # Every stage's imports (torch, NumPy) come after the pin: the libraries read it on load.
        if args.command == "predict":
            numerics.pin("portable")
            from pcam_pipeline import predict

            predict.main(
                args.checkpoint, args.inputs, args.out, args.threshold, args.device, tta=args.tta
            )
            return 0
        if args.command == "weights":
            from pcam_pipeline.models import weights

            weights.main(args.tag)
            return 0
        if args.command == "slides":
            numerics.pin("portable")
            from pcam_pipeline.slides import run

            options = run.Options(
                args.model_dir, args.card, args.threshold, args.spacing_um_px,
                args.batch_size, args.num_workers, args.top_k, not args.no_speedup, args.threads,
            )  # fmt: skip
            chunk = tuple(args.chunk) if args.chunk else None
            run.main(args.source, args.out, options, chunk, args.cohort_only)
            return 0
        if args.command == "drift":
            numerics.pin("portable")
            from pcam_pipeline.drift import check

            chosen = check.DriftOptions(args.reference, args.checkpoint, args.plots, args.slide)
            return check.main(args.input, args.out, chosen, load_params(args.params).drift)
        if args.command == "bundle":
            from pcam_pipeline.export import bundle

            bundle.main(args.export_dir, args.dir, RUNTIME_LOCK, args.drift_dir)
            return 0
        if args.command == "serve":
            from pcam_pipeline.serve import server

            chosen = {k: getattr(args, k) for k in ("host", "port", "precision")}
            settings = overridden(load_params(args.params).serve, chosen, "pcam serve's options")
            serving = (args.export_dir, args.device, args.threads, args.token_file)
            server.main(settings, server.ServeOptions(*serving, args.drift_reference))
            return 0
        if args.command == "model-get":
            from pcam_pipeline.export import registry

            registry.main(args.tag, args.out)
            return 0
        if args.command == "data-report":
            from pcam_pipeline.review import data_report

            data_report.main(args.base, args.out)
            return 0
        if args.command == "report":
            from pcam_pipeline.review import report

            report.main(args.base, args.rev, args.out, args.format)
            return 0
        # A training worker trains with its launcher's params, not with a file's.
        params = launched_params(os.environ) or load_params(args.params)
        numerics.pin(params.cpu.numerics)
        if args.command == "download":
            from pcam_pipeline.data.download import download_release

            download_release(params.fetch, args.dir)
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
