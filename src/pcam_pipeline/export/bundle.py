"""`pcam bundle DIR`: the exported model as one directory and one tarball, for a machine that
has nothing of this project (the SURF course's "files needed to run the model offline from a
USB stick").

DIR holds every file of models/export (checked against the model card's md5s, so a stale or
edited export is refused), `pcam_runner.py` (one file: numpy, pillow and onnxruntime only),
`requirements.txt` pinning those three as the runtime lock does, a README, and `drift/`, the
model's drift reference (models/drift, when drift_reference wrote it for this checkpoint: what
`pcam drift` and `pcam serve` test inputs against). DIR.tar.gz is written byte for byte the
same for the same files (sorted, no times, no owners).
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

from pcam_pipeline.drift.profile import ARRAYS_FILE, META_FILE, load_reference
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.export import runner
from pcam_pipeline.export.build import CARD_JSON, CARD_MD, FP32_FILE, md5_bytes
from pcam_pipeline.repro import atomic_path, read_json

RUNNER_FILE = "pcam_runner.py"
RUNNER_PACKAGES = ("numpy", "pillow", "onnxruntime")
DRIFT_SUBDIR = "drift"


def runner_requirements(lock: Path) -> str:
    """The runner's three packages as the runtime lock pins them."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, _, version = line.partition("==")
        if version and not line.startswith("#"):
            # "numpy==2.4.6 \": its hashes follow on the next lines (the runner's venv installs
            # these three with whatever they need, so not in hash-checking mode)
            pins[name.strip().lower()] = version.split()[0]
    missing = [name for name in RUNNER_PACKAGES if name not in pins]
    if missing:
        raise PipelineError(f"{lock}: no pin for {', '.join(missing)}; run `make lock`")
    return "".join(f"{name}=={pins[name]}\n" for name in RUNNER_PACKAGES)


def readme(card: dict) -> str:
    test = card["metrics"]["test"]
    return f"""# {card["model"]["name"]} ({card["model"]["architecture"]})

Test AUROC {test["auroc"]:.4f}, threshold {card["metrics"]["threshold"]["value"]:.4f} (chosen on
the validation split). Intended use and limits: {CARD_MD}.

    python -m venv venv && venv/bin/pip install -r requirements.txt
    venv/bin/python {RUNNER_FILE} PATCHES_DIR_OR_FILES --out scores.csv

Inputs: 96x96 RGB PNG/TIFF patches (or folders of them), or PCAM HDF5 files (needs h5py).
Other files: {FP32_FILE} (ONNX fp32: uint8 patches N x 96 x 96 x 3 in, probability out; the
runner's default), model.int8.onnx (`--model model.int8.onnx`), wsinfer/ (WSInfer:
`wsinfer run --model-path wsinfer/torchscript_model.pt --config wsinfer/config.json ...`),
repository/ (a Triton/KServe model repository).
"""


def verified_files(export_dir: Path) -> dict[str, bytes]:
    """Every file of the export, each checked against the model card's md5."""
    card_path = export_dir / CARD_JSON
    if not card_path.is_file():
        raise PipelineError(
            f"{card_path}: not found. Fix: run the export stage (`dvc repro export`)"
        )
    card = read_json(card_path)
    files = {CARD_JSON: card_path.read_bytes(), CARD_MD: (export_dir / CARD_MD).read_bytes()}
    for name, entry in card["files"].items():
        path = export_dir / name
        data = path.read_bytes() if path.is_file() else b""
        if md5_bytes(data) != entry["md5"]:
            raise PipelineError(
                f"{path}: missing or not the file the model card names (md5 {entry['md5']}). "
                f"Fix: restore the export (`dvc checkout {export_dir}`) or run `dvc repro export`"
            )
        files[name] = data
    return files


def drift_files(drift_dir: Path, card: dict) -> dict[str, bytes]:
    """The drift reference's two files under drift/, or none where `drift_dir` holds none; one
    written with another checkpoint than the export's is refused."""
    if not (drift_dir / META_FILE).is_file():
        return {}
    recorded = load_reference(drift_dir).meta.get("model_md5")
    exported = card["model"].get("checkpoint_md5")
    if recorded != exported:
        raise PipelineError(
            f"{drift_dir / META_FILE}: written with checkpoint md5 {recorded}, the export with "
            f"{exported}. Fix: `dvc repro drift_reference` (or --drift-dir the reference of "
            "this model)"
        )
    return {
        f"{DRIFT_SUBDIR}/{name}": (drift_dir / name).read_bytes()
        for name in (META_FILE, ARRAYS_FILE)
    }


def deterministic_tarball(files: dict[str, bytes], root: str) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(files):
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size, info.mtime = len(files[name]), 0
            info.mode = 0o755 if name == RUNNER_FILE else 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def main(export_dir: Path, out: Path, lock: Path, drift_dir: Path | None = None) -> None:
    files = verified_files(export_dir)
    card = read_json(export_dir / CARD_JSON)
    drift = drift_files(drift_dir, card) if drift_dir is not None else {}
    files.update(drift)
    files[RUNNER_FILE] = Path(runner.__file__).read_bytes()
    files["requirements.txt"] = runner_requirements(lock).encode()
    files["README.md"] = readme(card).encode()
    staged = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    for name, data in files.items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
    (staged / RUNNER_FILE).chmod(0o755)
    shutil.rmtree(out, ignore_errors=True)
    staged.rename(out)
    tarball = out.with_name(f"{out.name}.tar.gz")
    with atomic_path(tarball) as tmp:
        tmp.write_bytes(deterministic_tarball(files, out.name))
    print(f"bundle: {out}/ ({len(files)} files) and {tarball}")
    if drift_dir is not None and not drift:
        print(f"bundle: no drift reference in {drift_dir} (`dvc repro drift_reference` writes it)")
