"""numerics.pin: one instruction-set level for every library, set before they load."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcam_pipeline import numerics

XEON = {
    "vendor": "GenuineIntel",
    "model": "Intel(R) Xeon(R) Platinum",
    "flags": [
        "fpu",
        "sse2",
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "abm",
        "movbe",
        "avx512f",
    ],
    "machine": "x86_64",
}
# What a process that pinned and then loaded the libraries computes with.
REPORT = """
import json, os, torch
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
print(json.dumps({
    "torch": torch.backends.cpu.get_cpu_capability(),
    "numpy": sorted(target for target in __cpu_dispatch__ if __cpu_features__[target]),
    "env": {k: os.environ.get(k) for k in %r},
}))
"""


def clean_env() -> dict[str, str]:
    pinned = {*numerics.PORTABLE_ENV, numerics.NUMERICS_ENV}
    return {k: v for k, v in os.environ.items() if k not in pinned}


def report_after(pin_call: str) -> dict:
    code = f"from pcam_pipeline import numerics\n{pin_call}\n" + REPORT % [
        *numerics.PORTABLE_ENV,
        numerics.NUMERICS_ENV,
    ]
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_portable_pins_every_library_before_it_loads():
    pinned = report_after("numerics.pin('portable')")
    if numerics.missing_flags(numerics.cpu_identity()):
        pytest.skip("this CPU lacks x86-64-v3: nothing is pinned here (tested below)")
    assert pinned["torch"] == "AVX2"
    assert pinned["numpy"] == ["X86_V3"]
    assert pinned["env"] == {**numerics.PORTABLE_ENV, numerics.NUMERICS_ENV: "portable"}


def test_native_leaves_the_libraries_to_choose():
    unpinned = report_after("")
    native = report_after("numerics.pin('native')")
    assert native["torch"] == unpinned["torch"]
    assert native["numpy"] == unpinned["numpy"]
    assert native["env"] == {
        **dict.fromkeys(numerics.PORTABLE_ENV),
        numerics.NUMERICS_ENV: "native",
    }


def test_a_cpu_without_avx2_gets_a_warning_and_no_pinned_kernels(monkeypatch, caplog):
    for name in (*numerics.PORTABLE_ENV, numerics.NUMERICS_ENV):
        monkeypatch.delenv(name, raising=False)
    old_laptop = {**XEON, "flags": ["fpu", "sse2", "sse4_2", "avx"], "model": "Core i5-2520M"}
    with caplog.at_level(logging.WARNING, logger="pcam_pipeline.numerics"):
        numerics.pin("portable", old_laptop)
    # Forcing AVX2 kernels there would crash (OpenBLAS's Haswell kernels): nothing is forced.
    assert not set(numerics.PORTABLE_ENV) & set(os.environ)
    assert numerics.level(old_laptop) == "native"
    (message,) = caplog.messages
    assert "Core i5-2520M" in message and "avx2" in message and "differ from a dvc.lock" in message


def test_pinning_after_torch_loaded_says_it_cannot_apply(monkeypatch, caplog):
    import torch  # noqa: F401  (loaded, as in a notebook that imported torch first)

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with caplog.at_level(logging.WARNING, logger="pcam_pipeline.numerics"):
        numerics.pin("portable", XEON)
    assert any("cannot apply in this process" in m for m in caplog.messages)
    # Pinning what is already pinned (the test session, a DDP worker) is silent.
    caplog.clear()
    numerics.pin("portable", XEON)
    assert not caplog.messages


def test_other_architectures_lack_the_level():
    arm = {**XEON, "machine": "aarch64", "flags": ["fp", "asimd"]}
    assert numerics.missing_flags(arm) == list(numerics.LEVEL_FLAGS)
    assert numerics.missing_flags(XEON) == []


def test_cpu_identity_reads_the_first_processor(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7H12\n"
        "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nvendor_id\t: Other\n"
    )
    identity = numerics.cpu_identity(cpuinfo)
    assert identity["vendor"] == "AuthenticAMD"
    assert identity["model"] == "AMD EPYC 7H12"
    assert identity["flags"] == ["fpu", "avx2", "fma"]
