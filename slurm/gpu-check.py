"""Can this job train on the GPU? Run by slurm/lib.sh (pcam_gpu_check) inside the job's runtime (the
Apptainer image or the venv) before any DVC work, on GPU partitions. Exit 0 and one line of facts
when it can; otherwise exit 3 with what is wrong and the fix, so that a GPU job fails in its first
minute instead of training on the CPU at GPU rates.

Checked, in order: the installed torch is a CUDA build (torch.version.cuda), the node's NVIDIA
driver is at least the one that build needs (PCAM_CUDA_MIN_DRIVER, set in the image by
containers/Dockerfile; else the CUDA major version's row of containers/cuda-min-driver.txt, the
table containers/build.sh records in the image), and CUDA sees a device. The line
it prints names a MIG slice's profile (`MIG 1g.5gb`), from the device names or `nvidia-smi -L`.

The driver version comes from NVML (nvidia-ml-py, in the lock; libnvidia-ml is bound into the
container by `apptainer exec --nv`), else from PCAM_NODE_DRIVER (the wrapper's `nvidia-smi` on the
host). Standard library + torch only: it must run in any image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# The oldest driver each CUDA major runs on: one table for the image build and this check.
MIN_DRIVER_TABLE = Path(__file__).resolve().parent.parent / "containers" / "cuda-min-driver.txt"
DOCS = "docs/slurm.md#gpu-jobs-fail-fast"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split(".") if part.isdigit())


def min_driver_by_cuda_major(table: Path = MIN_DRIVER_TABLE) -> dict[str, str]:
    """CUDA major version -> the oldest NVIDIA driver it runs on (`13 580` lines, # comments)."""
    rows = (line.split() for line in table.read_text().splitlines() if not line.startswith("#"))
    return {row[0]: row[1] for row in rows if len(row) == 2}


def node_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML library, no driver, no permission: try the host's answer
        return os.environ.get("PCAM_NODE_DRIVER") or None


def problems(
    *,
    torch_version: str,
    torch_cuda: str | None,
    cuda_available: bool,
    device_count: int,
    driver: str | None,
    min_driver: str | None,
    where: str,
    partition: str,
) -> list[str]:
    """What stops training on the GPU; empty when nothing does."""
    if torch_cuda is None:
        return [
            f"the image has no CUDA: {where} holds torch {torch_version}, a CPU-only build "
            f"(torch.version.cuda is None), and this job is on the GPU partition '{partition}'. "
            "Fix: run in the CUDA image (PCAM_SIF=<path>/pcam-cu130.sif; get it with "
            "`apptainer pull oras://ghcr.io/<owner>/pcam-pipeline-sif:cu130-<commit>` or build it: "
            "docs/containers.md), or submit to a CPU partition, or set PCAM_REQUIRE_CUDA=0 to "
            f"train on the CPU anyway ({DOCS})."
        ]
    needed = min_driver or min_driver_by_cuda_major().get(torch_cuda.split(".")[0])
    if driver is None:
        if not cuda_available:
            return [
                f"no NVIDIA driver is visible in the job ({where}, torch {torch_version}, CUDA "
                f"{torch_cuda}): no GPU was allocated or it was not passed into the container. "
                "Fix: ask for one (--gpus=1, as slurm/site.env does) and run the image with "
                f"`apptainer exec --nv` (the wrappers do) ({DOCS})."
            ]
    elif needed and version_tuple(driver) < version_tuple(needed):
        return [
            f"the node's NVIDIA driver {driver} is older than the {needed} that {where}'s torch "
            f"{torch_version} (CUDA {torch_cuda}) needs. Fix: use an image built for older "
            "drivers (TORCH_VARIANT=cu126, docs/containers.md#older-nvidia-drivers), or a "
            f"partition whose nodes run driver >= {needed} ({DOCS})."
        ]
    if not cuda_available or device_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return [
            f"CUDA sees no GPU inside the job ({where}, torch {torch_version}, CUDA {torch_cuda}, "
            f"driver {driver or 'unknown'}, CUDA_VISIBLE_DEVICES={visible}). Fix: ask Slurm for a "
            "GPU (--gpus=1) and pass it into the container (`apptainer exec --nv`; the wrappers "
            f"do) ({DOCS})."
        ]
    return []


# A MIG slice's profile in a device name or an `nvidia-smi -L` line (`... MIG 1g.5gb ...`): the
# same patterns as pcam_pipeline.runtime.mig_facts, repeated here because this script runs before
# the project is known to import (standard library + torch only).
MIG_PROFILE = re.compile(r"\bMIG\s+(\d+g\.\d+gb)\b", re.IGNORECASE)


def smi_list() -> str:
    """`nvidia-smi -L` (GPUs and MIG instances), empty where it cannot run (the device names
    still carry the profile)."""
    try:
        return subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def mig_note(names: list[str], visible: str | None, smi_l: str) -> str:
    """`, MIG 1g.5gb x2 (one training worker)` for MIG slices, empty for whole GPUs."""
    uuids = [part.strip() for part in (visible or "").split(",") if part.strip().startswith("MIG-")]
    profiles = [m.group(1).lower() for m in map(MIG_PROFILE.search, names) if m]
    if not profiles:
        profiles = [m.group(1).lower() for m in map(MIG_PROFILE.search, smi_l.splitlines()) if m]
    if not (uuids or profiles):
        return ""
    instances = len(uuids) or len(profiles)
    note = f", MIG {','.join(sorted(set(profiles))) or 'slice'}"
    if instances > 1:
        note += f" x{instances} (NCCL does not run across MIG instances: one training worker)"
    return note


def check_line(
    torch_version: str,
    torch_cuda: str | None,
    driver: str | None,
    names: list[str],
    visible: str | None,
    smi_l: str,
) -> str:
    """The preflight's one line of facts: the build, the driver, the GPUs, and MIG slices."""
    return (
        f"gpu check: torch {torch_version} CUDA {torch_cuda}, driver {driver or 'unknown'}, "
        f"{len(names)} GPU(s): {', '.join(names)}{mig_note(names, visible, smi_l)}"
    )


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")  # torch warns about an old driver; we say it better
    import torch

    where = os.environ.get("PCAM_RUNTIME_DESC") or sys.prefix
    torch_cuda = torch.version.cuda
    available = bool(torch_cuda) and torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    driver = node_driver()
    found = problems(
        torch_version=torch.__version__,
        torch_cuda=torch_cuda,
        cuda_available=available,
        device_count=count,
        driver=driver,
        min_driver=os.environ.get("PCAM_CUDA_MIN_DRIVER") or None,
        where=where,
        partition=os.environ.get("SLURM_JOB_PARTITION", "?"),
    )
    if found:
        for problem in found:
            print(f"[pcam-slurm] error: {problem}", file=sys.stderr)
        return 3
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    print(
        check_line(
            torch.__version__,
            torch_cuda,
            driver,
            names,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            smi_list(),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
