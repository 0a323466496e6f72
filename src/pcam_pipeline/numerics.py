"""CPU numerics that give the same bits on every x86-64 machine with AVX2, at any thread count.

ATen, oneDNN, MKL, NumPy and OpenBLAS each pick their kernels by the CPU they find: AVX-512 on
one Xeon, AVX2 on a laptop, vendor-specific paths on AMD. The kernels add in other orders and
round differently, so the same seed trained other weights on another machine. `pin` sets every
one of them to the x86-64-v3 (AVX2 + FMA) level, and MKL to its one branch that computes the same
bits on Intel and AMD, through the variables they read when they load: `pcam` calls it before
anything imports torch or NumPy. What the variables cannot reach is handled in the code:

- oneDNN splits a convolution's weight gradient over the threads when it has more threads than
  output blocks, and adds the parts in another order: `training.portable_convolutions` computes
  that gradient on one thread (the forward pass and the input gradient never split a sum).
- MKL's vector square root differs between CPU vendors, and its compatible branch also between
  real and emulated CPUs: the optimisers run PyTorch's fused kernels, which use the exact
  `sqrt` instruction (`training.build_optimizer`).

This module imports neither torch nor NumPy, so that the CLI can call `pin` first.

Checked under qemu-user on emulated Intel (Haswell) and AMD (EPYC Rome) CPUs against an
AVX-512 Xeon, for 1 to 8 threads (tests/integration/test_cross_cpu.py, docs/reproducibility.md).
`cpu.numerics: native` in params.yaml leaves every library to choose, which is faster and
reproducible only on the same CPU model and thread count.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Numerics = Literal["portable", "native"]
LEVEL = "x86-64-v3"
# The CPU flags (as /proc/cpuinfo names them) that make up x86-64-v3; `abm` is LZCNT.
LEVEL_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (no AVX-512 variants)
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN: the convolutions
    # MKL: GEMMs and vector maths. COMPATIBLE is the branch MKL also takes on AMD CPUs (its
    # AVX2 branch there falls back to it for some shapes only); STRICT: any thread count.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "NPY_ENABLE_CPU_FEATURES": "X86_V3",  # NumPy's float64 exp/log have AVX-512 variants
    "OPENBLAS_CORETYPE": "Haswell",  # NumPy's and SciPy's BLAS (Zen runs the same kernels)
}
NUMERICS_ENV = "PCAM_CPU_NUMERICS"  # what `pin` chose, for the processes a stage starts
LIBRARIES = ("torch", "numpy")


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's vendor, model name and flags (Linux); the platform's words elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor describes them all
    except OSError:
        pass
    return {
        "vendor": fields.get("vendor_id"),
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "flags": fields.get("flags", "").split(),
        "machine": platform.machine(),
    }


def missing_flags(identity: dict[str, Any]) -> list[str]:
    """The x86-64-v3 flags this CPU lacks (all of them off x86-64)."""
    if identity["machine"] not in ("x86_64", "AMD64"):
        return list(LEVEL_FLAGS)
    return [flag for flag in LEVEL_FLAGS if flag not in identity["flags"]]


def pin(numerics: Numerics, identity: dict[str, Any] | None = None) -> None:
    """Set the libraries' kernel choice for this process and the processes it starts.

    Call it before torch or NumPy is imported: they read these variables once, when they load.
    """
    os.environ[NUMERICS_ENV] = numerics
    if numerics == "native":
        return
    identity = identity or cpu_identity()
    lacking = missing_flags(identity)
    if lacking:
        # Forcing AVX2 kernels on a CPU without them would crash; the libraries choose instead.
        log.warning(
            "this CPU (%s, %s) lacks %s of %s: its CPU results will differ from a dvc.lock made on "
            "an x86-64 CPU with AVX2 (docs/reproducibility.md)",
            identity["model"],
            identity["machine"],
            ", ".join(lacking),
            LEVEL,
        )
        return
    changed = {key: value for key, value in PORTABLE_ENV.items() if os.environ.get(key) != value}
    loaded = [name for name in LIBRARIES if name in sys.modules]
    if changed and loaded:
        log.warning(
            "%s already loaded: portable CPU numerics cannot apply in this process; start it "
            "through `pcam` (or import pcam_pipeline.numerics and call pin() first)",
            " and ".join(loaded),
        )
    os.environ.update(PORTABLE_ENV)


def active() -> Numerics:
    """What `pin` chose for this process (its children inherit it); native where nothing was
    pinned, as the libraries then choose for themselves."""
    return "portable" if os.environ.get(NUMERICS_ENV) == "portable" else "native"


def level(identity: dict[str, Any] | None = None) -> str:
    """The instruction-set level the libraries run at: x86-64-v3, or native."""
    pinned = active() == "portable" and not missing_flags(identity or cpu_identity())
    return LEVEL if pinned else "native"
