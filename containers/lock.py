#!/usr/bin/env python3
"""The locked environment, hashed: `uv pip compile --generate-hashes` resolves, this file splits.

    requirements-runtime.lock   the closure of pyproject.toml's [project] dependencies: exactly what
                                `pcam <stage>` imports and what the container images install. The
                                stages whose results it can change (train, evaluate, benchmark)
                                depend on this file in dvc.yaml.
    requirements.lock           `-r requirements-runtime.lock` plus the pins only the extras need
                                (dev: pytest, ruff, ...; serve; any other): what `make setup`
                                installs. A test-tool bump changes only this file, so it retrains
                                nothing.
    requirements-serve.lock     the closure of the serve extra: everything `pcam serve` imports,
                                what the serving image installs (no torch, no DVC).
    requirements-cu130.lock     the runtime lock with PyPI's CUDA 13.0 build of torch and the
                                NVIDIA wheels it pulls (make setup on Linux x86_64; cu130 image).

Every pin carries the sha256 of each file PyPI holds for that version (all platforms' wheels and the
sdist), from the index's metadata: nothing is downloaded. Installs check them (`--require-hashes`:
containers/install-lock.sh). Existing pins are constraints, so adding a dependency to pyproject.toml
resolves only what is new; `--upgrade NAME` lets NAME move.

    .venv/bin/python containers/lock.py lock [--upgrade NAME ...]   # make lock
    .venv/bin/python containers/lock.py check [--resolve]           # make lock-check
    .venv/bin/python containers/lock.py check-cuda requirements-cu130.lock
    .venv/bin/python containers/lock.py cuda cu126                  # make lock-cu126 (other index)
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "requirements-runtime.lock"
FULL = ROOT / "requirements.lock"
SERVE = ROOT / "requirements-serve.lock"
CU130 = ROOT / "requirements-cu130.lock"
INCLUDE = "-r requirements-runtime.lock"
# The platform every lock is resolved for (the images, `make setup` here): Linux x86_64, CPython
# 3.11 (3.11.7 is the venv's; some pins need >= 3.11.5). PyPI only: uv does not read pip.conf, and
# this machine's local indexes mirror PyPI's bytes anyway (docs/development.md).
PYTHON_VERSION = "3.11.7"
PLATFORM = "x86_64-manylinux_2_28"
INDEX = "https://pypi.org/simple"
HEADER_RUNTIME = (
    "# The runtime environment: the closure of pyproject.toml's [project] dependencies (what the\n"
    "# stages import and the images install). train/evaluate/benchmark depend on this file.\n"
    "# Regenerate: make lock (docs/development.md, 'Updating dependencies'). torch also carries\n"
    "# the hashes of its CPU build (+cpu) that the CPU image installs.\n"
)
HEADER_SERVE = (
    "# The serving environment: the closure of pyproject.toml's serve extra (what `pcam serve`\n"
    "# imports; the serving image installs it), at the versions of the other locks.\n"
    "# Regenerate: make lock (docs/development.md, 'Updating dependencies').\n"
)
HEADER_FULL = (
    "# The exact environment (make setup installs it): the runtime lock plus the extras' pins.\n"
    "# Regenerate: make lock (docs/development.md, 'Updating dependencies').\n"
)
HEADER_CUDA = (
    "# The runtime lock with PyPI's torch=={torch} Linux x86_64 wheel: the {variant}\n"
    "# build and the NVIDIA wheels it pulls. Needs an NVIDIA driver >= {driver} on the host.\n"
    "# Image: TORCH_VARIANT={variant} containers/build.sh image. Regenerate: make lock\n"
    "# (docs/development.md, 'Updating dependencies'); containers/lock.py check-cuda checks it.\n"
)
# Local version labels of wheels that are the same release (torch 2.13.0+cpu from the CPU index).
LOCAL_LABEL = re.compile(r"\+(cpu|cu\d+)$")
# What a CUDA build of torch adds to the runtime environment (its NVIDIA and compiler wheels).
CUDA_EXTRA = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# Where the CPU build of torch lies on this machine (the CPU image installs it); its hash joins
# torch's line in the runtime lock. Hashes of a +cpu build already there are kept for the same
# version, so a lock made where the PyTorch index is reachable keeps them here.
CPU_WHEELS = [Path(p) for p in os.environ.get("PCAM_TORCH_CPU_WHEELS", "/opt/wheels").split(":")]


class LockError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"lock.py: {message}")


@dataclass(frozen=True)
class Pin:
    name: str  # as the index spells it
    version: str
    hashes: tuple[str, ...]  # "sha256:..."

    def render(self, operator: str = "==") -> str:
        lines = [f"{self.name}{operator}{self.version}"]
        lines += [f"    --hash={h}" for h in self.hashes]
        return " \\\n".join(lines)


def parse_lock(text: str, source: str = "lock") -> tuple[dict[str, Pin], list[str]]:
    """Pins (canonical name -> Pin) and `-r` includes of a requirements file in pip's format."""
    pins: dict[str, Pin] = {}
    includes: list[str] = []
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split(" #", 1)[0].strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("-r "):
            includes.append(entry[3:].strip())
            continue
        spec, *options = entry.split()
        name, sep, version = spec.replace("===", "==").partition("==")
        if not sep:
            raise LockError(f"{source}: not an exact pin: {spec!r} (make lock)")
        hashes = tuple(o.removeprefix("--hash=") for o in options if o.startswith("--hash="))
        pins[canonicalize_name(name)] = Pin(name, version, hashes)
    return pins, includes


def read_pins(path: Path) -> dict[str, Pin]:
    """canonical name -> Pin from a lock file, following `-r` includes."""
    pins, includes = parse_lock(path.read_text(), path.name)
    for include in includes:
        pins = {**read_pins(path.parent / include), **pins}
    return pins


def project_requirements(pyproject: Path, extra: str | None = None) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    if extra is None:
        return list(project["dependencies"])
    return list(project.get("optional-dependencies", {})[extra])


def extras(pyproject: Path) -> list[str]:
    return sorted(tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {}))


def uv_compile(roots: list[str], constraints: dict[str, str], index: list[str]) -> dict[str, Pin]:
    """`uv pip compile --generate-hashes` of ROOTS for the lock platform, with every name in
    CONSTRAINTS held at its version."""
    with tempfile.TemporaryDirectory(prefix="pcam-lock-") as work:
        roots_in, cons_in, out = Path(work, "roots.in"), Path(work, "cons.txt"), Path(work, "out")
        roots_in.write_text("\n".join(roots) + "\n")
        cons_in.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        command = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--no-config"]
        command += ["--generate-hashes", "--no-header", "--no-annotate"]
        command += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, *index]
        command += ["--constraint", str(cons_in), "--output-file", str(out), str(roots_in)]
        result = subprocess.run(command, text=True, capture_output=True, check=False)
        if result.returncode != 0:
            raise LockError(
                "uv pip compile failed (the existing pins held as constraints):\n"
                f"{result.stderr.strip()}\n"
                "Fix: if uv says a pin conflicts, let it move with `make lock UPGRADE=NAME` or "
                "relax pyproject.toml; if it could not reach the index, retry where it can."
            )
        return parse_lock(out.read_text(), "uv's output")[0]


def old_constraints(paths: list[Path], upgrade: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in paths:
        if path.exists():
            for key, pin in read_pins(path).items():
                if key not in upgrade:
                    found[key] = LOCAL_LABEL.sub("", pin.version)
    return found


def cpu_build_hashes(pin: Pin, old: Pin | None) -> tuple[str, ...]:
    """PIN's hashes plus those of its +cpu wheels: the ones in the wheel folders, and the ones the
    runtime lock already named for the same version (found on another machine)."""
    found = set(pin.hashes)
    if old is not None and LOCAL_LABEL.sub("", old.version) == pin.version:
        found |= set(old.hashes)
    stem = pin.name.replace("-", "_")
    for folder in (f for f in CPU_WHEELS if f.is_dir()):
        for wheel in sorted(folder.glob(f"{stem}-{pin.version}+cpu-*.whl")):
            found.add("sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest())
    return tuple(sorted(found))


def body(pins: dict[str, Pin], keys: set[str], torch_operator: str = "==") -> str:
    entries = []
    for key in sorted(keys):
        entries.append(pins[key].render(torch_operator if key == "torch" else "=="))
    return "\n".join(entries) + "\n"


def expected(
    pyproject: Path, constraints: dict[str, str], old_runtime: dict[str, Pin]
) -> dict[Path, str]:
    """The four lock files' text, resolved with CONSTRAINTS held."""
    index = ["--index-url", INDEX]
    everything = project_requirements(pyproject)
    for extra in extras(pyproject):
        everything += project_requirements(pyproject, extra)
    full = uv_compile(everything, constraints, index)
    held = {key: pin.version for key, pin in full.items()}
    runtime = uv_compile(project_requirements(pyproject), held, index)
    serve = uv_compile(project_requirements(pyproject, "serve"), held, index)
    # A CUDA build's NVIDIA and compiler wheels are that build's (the cu130 lock pins them); the
    # runtime and dev locks name only what every build of the same release shares.
    torch_closure = uv_compile([f"torch=={held['torch']}"], held, index) if "torch" in held else {}
    build_only = {key for key in torch_closure if CUDA_EXTRA.match(key)}
    runtime_keys = set(runtime) - build_only
    dev_keys = set(full) - set(runtime) - build_only
    # The CPU image installs torch's +cpu build (and torchvision's, from the PyTorch index).
    cpu_runtime = dict(runtime)
    for key in {"torch", "torchvision"} & set(runtime):
        pin = runtime[key]
        cpu_runtime[key] = Pin(pin.name, pin.version, cpu_build_hashes(pin, old_runtime.get(key)))
    header = HEADER_CUDA.format(torch=runtime["torch"].version, variant="cu130", driver=580)
    return {
        RUNTIME: HEADER_RUNTIME + body(cpu_runtime, runtime_keys),
        FULL: HEADER_FULL + INCLUDE + "\n" + body(full, dev_keys),
        SERVE: HEADER_SERVE + body(serve, set(serve)),
        # `===` (exact string) rather than `==`: a local wheel folder's torch 2.13.0+cpu also
        # satisfies ==2.13.0 and sorts above it, so `make setup` gets PyPI's build, the one
        # PyPI's torchvision is built against.
        CU130: header + body(runtime, set(runtime), torch_operator="==="),
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def locks_now(upgrade: set[str]) -> dict[Path, str]:
    constraints = old_constraints([RUNTIME, FULL, SERVE, CU130], upgrade)
    old_runtime = read_pins(RUNTIME) if RUNTIME.exists() else {}
    return expected(ROOT / "pyproject.toml", constraints, old_runtime)


def cmd_lock(upgrade: set[str]) -> None:
    texts = locks_now(upgrade)
    for path, text in texts.items():
        write_atomic(path, text)
    problems = consistency(*(parse_any(text) for text in texts.values()))
    if problems:
        raise LockError("the new locks disagree:\n  " + "\n  ".join(problems))
    counts = ", ".join(f"{p.name} ({len(parse_lock(t)[0])} pins)" for p, t in texts.items())
    print(f"wrote {counts}")


def parse_any(text: str) -> dict[str, Pin]:
    return parse_lock(text)[0]


def unhashed(text: str) -> list[str]:
    """Pins in TEXT without a `--hash=sha256:` (what `--require-hashes` refuses)."""
    return [pin.name for pin in parse_any(text).values() if not pin.hashes]


def consistency(
    runtime: dict[str, Pin], dev: dict[str, Pin], serve: dict[str, Pin], cuda: dict[str, Pin]
) -> list[str]:
    """What must hold between the four locks (DEV: requirements.lock's own pins)."""
    problems = [
        f"{n}: in both the runtime lock and requirements.lock" for n in set(runtime) & set(dev)
    ]
    full = {**runtime, **dev}
    for key, pin in serve.items():
        if key in full and full[key].version != pin.version:
            problems.append(
                f"{key}: {pin.version} in the serve lock, {full[key].version} in requirements.lock"
            )
        if key not in full:
            problems.append(f"{key}: in the serve lock, not in requirements.lock")
    for key, pin in runtime.items():
        if key in cuda and LOCAL_LABEL.sub("", cuda[key].version) != pin.version:
            problems.append(
                f"{key}: {pin.version} in the runtime lock, {cuda[key].version} in the cu130 lock"
            )
    return problems


def roots_missing(pyproject: Path, locks: dict[str | None, dict[str, Pin]]) -> list[str]:
    """Requirements of pyproject.toml (per extra; None = [project] dependencies) that the lock
    meant to hold them does not pin, or pins outside the requirement's range."""
    environment = {**default_environment(), "python_full_version": PYTHON_VERSION}
    environment |= {
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "platform_system": "Linux",
    }
    problems = []
    for extra, pins in locks.items():
        for raw in project_requirements(pyproject, extra):
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate(
                {**environment, "extra": extra or ""}
            ):
                continue
            pin = pins.get(canonicalize_name(req.name))
            where = "[project] dependencies" if extra is None else f"the {extra} extra"
            if pin is None:
                problems.append(f"{req.name} ({where}) is not in the lock")
            elif not req.specifier.contains(LOCAL_LABEL.sub("", pin.version), prereleases=True):
                problems.append(f"{req.name}{req.specifier} ({where}): the lock pins {pin.version}")
    return problems


def cmd_check(resolve: bool) -> None:
    """Offline: every pin hashed, the locks consistent, pyproject's requirements pinned. With
    --resolve, also that `make lock` would write the same bytes (uv, PyPI's metadata)."""
    problems = [f"{path.name}: no --hash on {names}" for path in (RUNTIME, FULL, SERVE, CU130)
                if (names := unhashed(path.read_text()))]  # fmt: skip
    runtime, dev, serve, cuda = (parse_any(p.read_text()) for p in (RUNTIME, FULL, SERVE, CU130))
    problems += consistency(runtime, dev, serve, cuda)
    pyproject = ROOT / "pyproject.toml"
    full = {**runtime, **dev}
    locks: dict[str | None, dict[str, Pin]] = {None: runtime}
    locks |= {extra: serve if extra == "serve" else full for extra in extras(pyproject)}
    problems += roots_missing(pyproject, locks)
    if not problems and resolve:
        for path, text in locks_now(set()).items():
            if path.read_text() != text:
                problems.append(f"{path.name} is not what `make lock` writes now")
    if problems:
        raise LockError("the locks disagree with pyproject.toml or each other (fix: make lock):\n  "
                        + "\n  ".join(problems))  # fmt: skip
    print("the locks agree with pyproject.toml and each other; every pin is hashed")


def cmd_check_cuda(path: Path) -> None:
    """A CUDA lock is the runtime lock, with torch's CUDA wheels added and nothing else changed."""
    runtime, cuda = read_pins(RUNTIME), read_pins(path)
    versions = {name: LOCAL_LABEL.sub("", pin.version) for name, pin in cuda.items()}
    problems = [f"{n}: {runtime[n].version} in the runtime lock, {versions.get(n)} here"
                for n in runtime if versions.get(n) != runtime[n].version]  # fmt: skip
    extra = sorted(n for n in set(cuda) - set(runtime) if not CUDA_EXTRA.match(n))
    if extra:
        problems.append(f"not in the runtime lock and not a CUDA wheel: {extra}")
    if unhashed(path.read_text()):
        problems.append(f"pins without a --hash: {unhashed(path.read_text())}")
    if problems:
        raise SystemExit(f"lock.py: {path.name}:\n  " + "\n  ".join(problems))
    added = len(set(cuda) - set(runtime))
    print(f"{path.name}: the runtime lock plus {added} CUDA wheels")


def cmd_cuda(variant: str) -> None:
    """requirements-VARIANT.lock for a torch build from the PyTorch index (cu126, ...): the runtime
    pins held, torch and torchvision as that index builds them. cu130 is PyPI's: `make lock`."""
    if not re.fullmatch(r"cu\d+", variant):
        raise LockError(f"not a CUDA variant: {variant}")
    driver = subprocess.run(
        [ROOT / "containers" / "build.sh", "print-min-driver"],
        env={**os.environ, "TORCH_VARIANT": variant},
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    runtime = read_pins(RUNTIME)
    held = {k: p.version for k, p in runtime.items() if k not in ("torch", "torchvision")}
    index = ["--index-url", f"https://download.pytorch.org/whl/{variant}"]
    index += ["--extra-index-url", INDEX, "--index-strategy", "unsafe-best-match"]
    pins = uv_compile(project_requirements(ROOT / "pyproject.toml"), held, index)
    torch = LOCAL_LABEL.sub("", pins["torch"].version)
    header = HEADER_CUDA.format(torch=torch, variant=variant, driver=driver)
    header = header.replace("Regenerate: make lock\n", f"Regenerate: make lock-{variant}\n")
    path = ROOT / f"requirements-{variant}.lock"
    write_atomic(path, header + body(pins, set(pins), torch_operator="=="))
    cmd_check_cuda(path)


def main(argv: list[str]) -> None:
    match argv:
        case ["lock", *rest] if all(a.startswith("--upgrade=") for a in rest):
            cmd_lock({canonicalize_name(a.split("=", 1)[1]) for a in rest})
        case ["check"]:
            cmd_check(resolve=False)
        case ["check", "--resolve"]:
            cmd_check(resolve=True)
        case ["check-cuda", path]:
            cmd_check_cuda(Path(path))
        case ["cuda", variant]:
            cmd_cuda(variant)
        case _:
            print(__doc__, file=sys.stderr)
            raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
