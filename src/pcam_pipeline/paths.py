"""Every file the pipeline writes, named once; dvc.yaml names the same paths (a test checks)."""

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
RUNTIME_LOCK = Path("requirements-runtime.lock")  # the pins of what the stages import

RAW_DIR = Path("data/raw")  # official PCAM files from `pcam download`, pinned by data.dvc
PCAM_DIR = Path("data/pcam")  # fetch: PCAM-format HDF5, whatever the source
PROCESSED_DIR = Path("data/processed")  # preprocess: training-ready splits + stats

VALIDATE_REPORT = Path("reports/validate.json")
PREPROCESS_REPORT = Path("reports/preprocess.json")

MODELS_DIR = Path("models")
BEST_CHECKPOINT = MODELS_DIR / "best.pt"
LAST_CHECKPOINT = MODELS_DIR / "last.pt"
TRAIN_LIVE_DIR = Path("dvclive/train")

METRICS_FILE = Path("reports/metrics.json")
EVALUATE_DIR = Path("reports/evaluate")
SLICES_FILE = EVALUATE_DIR / "slices.json"
ERRORS_IMAGE = EVALUATE_DIR / "confident_errors.png"

BENCHMARK_FILE = Path("reports/benchmark.json")
BENCHMARK_DIR = Path("reports/benchmark")

EXPORT_DIR = MODELS_DIR / "export"  # export: the model as its users run it (docs/export.md)
EXPORT_REPORT = Path("reports/export.json")
EXPORT_BENCH_FILE = Path("reports/export_bench.json")  # export_bench: parity and speed here

DRIFT_DIR = MODELS_DIR / "drift"  # drift_reference: the profile inputs are tested against
DRIFT_PLOTS_DIR = Path("reports/drift")  # `pcam drift`: reference-vs-input histograms

# Train and evaluate read the processed data from here when set (node-local staging on Slurm).
TRAIN_DATA_DIR_ENV = "PCAM_TRAIN_DATA_DIR"
