"""`pcam weights download TAG`: a timm model's pretrained weights from the Hugging Face hub into
weights/, as a versioned input of the train stage (compute nodes have no internet; the train
stage never downloads).

The hub's endpoint is $HF_ENDPOINT when set (a mirror, or a test's local server). The file is
checked to be safetensors before it is renamed into place; DVC then tracks it like the data.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from pcam_pipeline.errors import PipelineError, first_sentence
from pcam_pipeline.params import WEIGHTS_DIR, WEIGHTS_SUFFIX
from pcam_pipeline.repro import atomic_path

log = logging.getLogger(__name__)
HUB_ORGANISATION = "timm"  # timm's weights live in the hub's repositories timm/<model>.<tag>
HUB_FILE = "model.safetensors"


def weights_path(tag: str, directory: Path = Path(WEIGHTS_DIR)) -> Path:
    return directory / f"{tag}{WEIGHTS_SUFFIX}"


def download(tag: str, directory: Path = Path(WEIGHTS_DIR)) -> Path:
    """Fetch `timm/<tag>`'s model.safetensors into `directory/<tag>.safetensors`, atomically.

    `tag` is timm's pretrained name, `<architecture>.<pretrained tag>` (e.g. resnet18.a1_in1k).
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from safetensors import SafetensorError, safe_open

    if "/" in tag or not tag:
        raise PipelineError(
            f"'{tag}': give timm's pretrained name, e.g. resnet18.a1_in1k (the hub's timm/<name>)"
        )
    final = weights_path(tag, directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".download-{tag}-") as staging:
        try:
            fetched = huggingface_hub.hf_hub_download(
                f"{HUB_ORGANISATION}/{tag}", HUB_FILE, local_dir=staging
            )
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            said = first_sentence(str(exc)) or type(exc).__name__
            raise PipelineError(
                f"{HUB_ORGANISATION}/{tag}/{HUB_FILE}: download failed ({said}). Fix: check the "
                "tag (timm.list_pretrained()), the network (a login node, not a compute node), "
                "and HF_ENDPOINT if a mirror is meant"
            ) from None
        try:
            with safe_open(fetched, framework="pt") as handle:
                count = len(list(handle.keys()))
        except (SafetensorError, OSError) as exc:
            raise PipelineError(
                f"{HUB_ORGANISATION}/{tag}/{HUB_FILE}: not a safetensors file ({exc})"
            ) from None
        with atomic_path(final) as tmp:
            shutil.move(fetched, tmp)
    log.info("wrote %s (%d tensors)", final, count)
    return final


def main(tag: str, directory: Path = Path(WEIGHTS_DIR)) -> None:
    path = download(tag, directory)
    print(
        f"{path}: now track it like the data and commit its hash:\n"
        f"  dvc add {path}\n"
        f"  git add {path}.dvc {path.parent}/.gitignore && git commit -m 'weights: {tag}'\n"
        f"  dvc push   # where a remote is set\n"
        f"then train from it: dvc exp run -S train.model=timm -S train.timm.name="
        f"{tag.split('.')[0]} -S train.timm.pretrained={path}"
    )
