"""Where a stage runs: the processed-data directory, the torch device and its precision, what
the GPU is (a whole one or a MIG slice) and what to say when a batch does not fit it.

Shared by train, evaluate, benchmark and `pcam predict`, so that none of them imports another.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from pcam_pipeline import numerics
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.paths import PROCESSED_DIR, TRAIN_DATA_DIR_ENV


def data_dir() -> Path:
    """The processed splits: node-local staging when PCAM_TRAIN_DATA_DIR is set, else the repo's."""
    return Path(os.environ.get(TRAIN_DATA_DIR_ENV, PROCESSED_DIR))


def processed_data() -> ProcessedData:
    """The processed dataset this stage reads (in `data_dir`)."""
    return ProcessedData(data_dir())


def resolve_device(choice: str) -> torch.device:
    """`auto` | `cpu` | `cuda` as a device; asking for CUDA where there is none is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device is 'cuda' but no CUDA device is visible; "
            "use 'auto' or 'cpu', or run on a GPU node (`--gpus=1`)"
        )
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def uses_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast only on CUDA: on the CPU it is slower and changes the numbers."""
    return requested and device.type == "cuda"


def uses_channels_last(device: torch.device) -> bool:
    """channels_last feeds cuDNN's fastest convolutions; on the CPU it buys nothing."""
    return device.type == "cuda"


def cpu_numerics_record() -> dict[str, Any]:
    """What decided this process's CPU numbers, for a provenance record: the numerics mode and
    the level the libraries run at, the CPU, and the thread count.

    The vendor and model are what the operating system reports (/proc/cpuinfo: the host's,
    under qemu-user); `vector_extensions` are what the CPU itself answers (CPUID, via NumPy).
    """
    identity = numerics.cpu_identity()
    return {
        "numerics": numerics.active(),
        "level": numerics.level(identity),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": identity["vendor"],
        "cpu_model": identity["model"],
        "vector_extensions": vector_extensions(),
        "torch_threads": torch.get_num_threads(),
        "environment": {name: os.environ.get(name) for name in numerics.PORTABLE_ENV},
    }


def vector_extensions() -> list[str]:
    """The vector extensions the CPU reports (CPUID) among those that change kernel choice."""
    from numpy._core._multiarray_umath import __cpu_features__

    return [name for name in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX") if __cpu_features__[name]]


# --- MIG: a slice of a GPU (the course's `gpu_course` partition gives an A100's 1g.5gb) ---------
#
# A MIG instance is its own device to CUDA, with a fraction of the SMs and memory, and NCCL does
# not run across instances. Three places say a job got one: the device name CUDA reports
# (`NVIDIA A100-SXM4-40GB MIG 1g.5gb`), `nvidia-smi -L` (a `MIG 1g.5gb Device 0: (UUID: MIG-...)`
# line under its GPU), and the `MIG-` UUIDs Slurm puts in CUDA_VISIBLE_DEVICES. Pure functions of
# those recorded texts, so the tests need no GPU.

MIG_PROFILE = re.compile(r"\bMIG\s+(\d+g\.\d+gb)\b", re.IGNORECASE)
MIG_SMI_LINE = re.compile(r"^\s*MIG\s+(\S+)\s+Device\s+\d+:\s*\(UUID:\s*(MIG-[^)\s]+)\)")


def mig_profile(device_name: str | None) -> str | None:
    """The MIG profile in a device name (`... MIG 1g.5gb` -> `1g.5gb`), None for a whole GPU."""
    found = MIG_PROFILE.search(device_name or "")
    return found.group(1).lower() if found else None


def mig_uuids(cuda_visible_devices: str | None) -> list[str]:
    """The MIG instances named in CUDA_VISIBLE_DEVICES (`MIG-<uuid>` entries), in order."""
    entries = (part.strip() for part in (cuda_visible_devices or "").split(","))
    return [entry for entry in entries if entry.startswith("MIG-")]


def mig_instances_listed(nvidia_smi_l: str) -> list[tuple[str, str]]:
    """(profile, UUID) of every MIG instance in `nvidia-smi -L` output."""
    found = (MIG_SMI_LINE.match(line) for line in nvidia_smi_l.splitlines())
    return [(match.group(1), match.group(2)) for match in found if match]


def mig_facts(
    device_names: list[str],
    cuda_visible_devices: str | None = None,
    nvidia_smi_l: str | None = None,
) -> dict[str, Any]:
    """What a job's GPUs are, MIG-wise: {"mig": bool, "profile": "1g.5gb" | None,
    "instances": how many MIG instances this process may use}.

    CUDA_VISIBLE_DEVICES decides what the process sees, so its MIG UUIDs count first (CUDA may
    enumerate only one of them); else the device names; `nvidia-smi -L` fills in the profile
    (it lists the node's instances, so it counts only where nothing narrower says).
    """
    named = [profile for profile in map(mig_profile, device_names) if profile]
    uuids = mig_uuids(cuda_visible_devices)
    listed = mig_instances_listed(nvidia_smi_l or "")
    if uuids and listed:  # the profile of each visible instance, where nvidia-smi names it
        by_uuid = dict((uuid, profile) for profile, uuid in listed)
        named = named or [by_uuid[uuid] for uuid in uuids if uuid in by_uuid]
    instances = len(uuids) or len(named) or (len(listed) if cuda_visible_devices is None else 0)
    # A whole GPU on a node whose other GPU is split still lists MIG lines: they name a profile
    # only when this process has instances.
    profiles = named or ([profile for profile, _ in listed] if instances else [])
    if not (instances or profiles):
        return {"mig": False, "profile": None, "instances": 0}
    return {
        "mig": True,
        "profile": ",".join(sorted(set(profiles))) or None,
        "instances": max(instances, 1),
    }


def nvidia_smi_list() -> str | None:
    """`nvidia-smi -L` (GPUs and their MIG instances), None where it cannot run."""
    try:
        return subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_record(ask_smi: bool = False) -> dict[str, Any] | None:
    """This process's GPUs for a provenance or environment record: their names and the MIG
    facts; None without CUDA (a CPU run's record is unchanged). `ask_smi` also runs
    `nvidia-smi -L` (seconds; the benchmarks, not every checkpoint save)."""
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {
        "names": names,
        "cuda_visible_devices": visible,
        **mig_facts(names, visible, nvidia_smi_list() if ask_smi else None),
    }


# --- fit before training: does a step at train.batch_size fit the device's memory? ------------

GIB = 1024**3


def out_of_memory_error(
    *,
    batch_size: int,
    model: str,
    compile_mode: str,
    free_bytes: int | None,
    total_bytes: int | None,
    device_name: str | None,
    when: str,
    detail: str = "",
) -> PipelineError:
    """The stage's error for a CUDA out-of-memory: what ran out, the memory found, and the fix.

    `when` says where: before the first epoch (nothing was written) or at an epoch and batch
    (the last checkpoint is kept as it was). Pure, so the tests give it simulated figures.
    """
    if free_bytes is not None and total_bytes:
        memory = f"{free_bytes / GIB:.2f} GiB free of {total_bytes / GIB:.2f} GiB"
    else:
        memory = "memory unknown"
    where = device_name or "the GPU"
    profile = mig_profile(device_name)
    slice_note = f" (a MIG {profile} slice: a fraction of the GPU's memory)" if profile else ""
    fixes = [f"a smaller train.batch_size (e.g. {max(batch_size // 2, 1)})"]
    if compile_mode == "reduce-overhead":
        fixes.append("train.compile: off (CUDA graphs keep a memory pool of their own)")
    elif compile_mode != "off":
        fixes.append("train.compile: off")
    fixes.append("or a smaller train.model")
    cause = f" ({detail.splitlines()[0][:200]})" if detail else ""
    return PipelineError(
        f"CUDA ran out of memory {when}: train.batch_size {batch_size} with model '{model}'"
        f" (train.compile: {compile_mode}) does not fit {where}{slice_note}: {memory}{cause}. "
        f"Fix: {', '.join(fixes)}; see docs/slurm.md#mig-slices"
    )


def memory_found(device: torch.device) -> tuple[int | None, int | None]:
    """(free, total) bytes of a CUDA device after returning the allocator's cached blocks;
    (None, None) where they cannot be read."""
    if device.type != "cuda":
        return None, None
    try:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # no driver, or a CPU-only build of torch
        return None, None
    return int(free), int(total)
