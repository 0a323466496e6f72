#!/usr/bin/env python3
"""The locked environment, split in two: what the pipeline runs with, and the tools around it.

    requirements-runtime.lock   the closure of pyproject.toml's [project] dependencies: exactly what
                                `pcam <stage>` imports and what the container images install. The
                                stages whose results it can change (train, evaluate, benchmark)
                                depend on this file in dvc.yaml.
    requirements.lock           `-r requirements-runtime.lock` plus the pins only the dev extra
                                needs (pytest, ruff, pre-commit, moto, actionlint, ...): what
                                `make setup` installs. A test-tool bump changes only this file,
                                so it retrains nothing.
    requirements-serve.lock     the closure of the serve extra: everything `pcam serve` imports,
                                what the serving image installs (no torch, no DVC).
    requirements-cu130.lock     the runtime lock with PyPI's CUDA 13.0 build of torch and the
                                NVIDIA wheels it pulls (containers/build.sh, TORCH_VARIANT=cu130).

Run with the project's venv (it reads the installed distributions, offline):

    .venv/bin/python containers/lock.py split    # rewrite the two CPU locks from .venv
    .venv/bin/python containers/lock.py check    # fail if they disagree with .venv or each other
    .venv/bin/python containers/lock.py check-cuda requirements-cu130.lock
    containers/lock.py cuda-lock REPORT OUT VARIANT MIN_DRIVER   # make lock-cu130 runs it

`split` and `check` need the venv to hold exactly the locked environment (`make setup`).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "requirements-runtime.lock"
FULL = ROOT / "requirements.lock"
SERVE = ROOT / "requirements-serve.lock"
INCLUDE = "-r requirements-runtime.lock"
HEADER_RUNTIME = (
    "# The runtime environment: the closure of pyproject.toml's [project] dependencies (what the\n"
    "# stages import and the images install). train/evaluate/benchmark depend on this file.\n"
    "# Regenerate: see docs/development.md, 'Updating dependencies' (containers/lock.py split).\n"
)
HEADER_SERVE = (
    "# The serving environment: the closure of pyproject.toml's serve extra (what `pcam serve`\n"
    "# imports; the serving image installs it), at the versions of the other locks.\n"
    "# Regenerate: see docs/development.md, 'Updating dependencies' (containers/lock.py split).\n"
)
HEADER_FULL = (
    "# The exact environment (make setup installs it): the runtime lock plus the dev tools.\n"
    "# Regenerate: see docs/development.md, 'Updating dependencies' (containers/lock.py split).\n"
)
# Local version labels of wheels that are the same release (torch 2.13.0+cpu from the CPU index).
LOCAL_LABEL = re.compile(r"\+(cpu|cu\d+)$")
# What a CUDA build of torch adds to the runtime environment (its NVIDIA and compiler wheels).
CUDA_EXTRA = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def installed() -> dict[str, tuple[str, metadata.Distribution]]:
    """canonical name -> (name as pip freeze prints it, distribution), for this interpreter."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonicalize_name(name)] = (name, dist)
    return found


def project_requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def closure(roots: list[Requirement], dists: dict) -> set[str]:
    """Canonical names of ROOTS and everything they need, transitively, on this platform."""
    environment = default_environment()
    seen: set[str] = set()
    todo: list[tuple[Requirement, str]] = [(r, "") for r in roots]
    visited_extras: set[tuple[str, str]] = set()
    while todo:
        req, from_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": from_extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in dists:
            raise SystemExit(f"lock.py: {req} is needed but not installed: run `make setup`")
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in visited_extras:
                continue
            visited_extras.add((name, extra))
            seen.add(name)
            for sub in dists[name][1].requires or []:
                todo.append((Requirement(sub), extra))
    return seen


def pins(names: set[str], dists: dict) -> list[str]:
    lines = []
    for name in names:
        shown, dist = dists[name]
        version = LOCAL_LABEL.sub("", dist.version)
        lines.append(f"{shown}=={version}")
    return sorted(lines, key=lambda line: line.lower())


def read_pins(path: Path) -> dict[str, str]:
    """canonical name -> version from a lock file (following `-r` includes)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            found.update(read_pins(path.parent / line[3:].strip()))
            continue
        name, sep, version = line.replace("===", "==").partition("==")
        if not sep:
            raise SystemExit(f"lock.py: {path.name}: not an exact pin: {line!r}")
        found[canonicalize_name(name)] = version
    return found


def expected(dists: dict) -> tuple[str, str, str]:
    # A CUDA build's NVIDIA and compiler wheels are that build's (requirements-cu130.lock pins
    # them); the runtime and dev locks name only what every build of the same release shares.
    build_only = {n for n in closure([Requirement("torch")], dists) if CUDA_EXTRA.match(n)}
    runtime = closure(project_requirements(), dists) - build_only
    everything = {
        n for n in dists if n not in ("pcam-pipeline", "pip", "setuptools", "wheel")
    } - build_only
    serve = closure(project_requirements("serve"), dists) - build_only
    dev = (closure(project_requirements("dev"), dists) | serve) - runtime - build_only
    stray = everything - runtime - dev
    if stray:
        raise SystemExit(
            f"lock.py: installed but needed by neither [project] dependencies nor the dev extra: "
            f"{sorted(stray)} (pip uninstall them, or add them to pyproject.toml)"
        )
    runtime_text = HEADER_RUNTIME + "\n".join(pins(runtime, dists)) + "\n"
    full_text = HEADER_FULL + INCLUDE + "\n" + "\n".join(pins(dev, dists)) + "\n"
    serve_text = HEADER_SERVE + "\n".join(pins(serve, dists)) + "\n"
    return runtime_text, full_text, serve_text


def cmd_split() -> None:
    texts = expected(installed())
    for path, text in zip((RUNTIME, FULL, SERVE), texts, strict=True):
        path.write_text(text)
    print(f"wrote {RUNTIME.name} ({texts[0].count('==')} pins), {FULL.name}, {SERVE.name}")


def cmd_check() -> None:
    texts = expected(installed())
    problems = []
    for path, text in zip((RUNTIME, FULL, SERVE), texts, strict=True):
        if read_pins_text(path.read_text()) != read_pins_text(text):
            problems.append(f"{path.name} differs from what .venv holds (containers/lock.py split)")
    if problems:
        raise SystemExit("lock.py: " + "; ".join(problems))
    print("locks agree with the environment")


def read_pins_text(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if "==" in line}


def cmd_check_cuda(path: Path) -> None:
    """A CUDA lock is the runtime lock, with torch's CUDA wheels added and nothing else changed."""
    runtime, cuda = read_pins(RUNTIME), read_pins(path)
    cuda = {name: LOCAL_LABEL.sub("", version) for name, version in cuda.items()}
    problems = [f"{n}: {runtime[n]} in the runtime lock, {cuda.get(n)} here" for n in runtime
                if cuda.get(n) != runtime[n]]  # fmt: skip
    extra = sorted(n for n in set(cuda) - set(runtime) if not CUDA_EXTRA.match(n))
    if extra:
        problems.append(f"not in the runtime lock and not a CUDA wheel: {extra}")
    if problems:
        raise SystemExit(f"lock.py: {path.name}:\n  " + "\n  ".join(problems))
    added = len(set(cuda) - set(runtime))
    print(f"{path.name}: the runtime lock plus {added} CUDA wheels")


def cmd_cuda_lock(report: Path, out: Path, variant: str, min_driver: str) -> None:
    """Write OUT: the runtime lock, with torch and its CUDA wheels as `pip install --dry-run
    --report REPORT` resolved them against PyPI (Makefile: `make lock-cu130`)."""
    import json

    resolved = {
        canonicalize_name(item["metadata"]["name"]): (
            item["metadata"]["name"],
            item["metadata"]["version"],
            item["download_info"]["url"],
        )
        for item in json.loads(report.read_text())["install"]
    }
    runtime = read_pins(RUNTIME)
    problems = [f"{n}: runtime lock {v}, resolved {resolved.get(n, (0, None))[1]}"
                for n, v in runtime.items() if resolved.get(n, (0, None))[1] != v]  # fmt: skip
    if problems:
        raise SystemExit(
            "lock.py: the resolution left the runtime pins:\n  " + "\n  ".join(problems)
        )
    torch_url = resolved["torch"][2]
    if resolved["torch"][1].endswith("+cpu") or "manylinux" not in torch_url:
        raise SystemExit(f"lock.py: torch resolved to {torch_url}, not a Linux CUDA wheel")
    torch_version = resolved["torch"][1]
    lines = [
        f"# The runtime lock with PyPI's torch=={torch_version} Linux x86_64 wheel: the {variant}",
        "# build and the NVIDIA wheels it pulls. "
        f"Needs an NVIDIA driver >= {min_driver} on the host.",
        f"# Image: TORCH_VARIANT={variant} containers/build.sh image. "
        f"Regenerate: make lock-{variant}",
        "# (docs/development.md, 'Updating dependencies'); "
        "containers/lock.py check-cuda checks it.",
    ]
    # `===` (exact string) rather than `==`: a local wheel folder's torch 2.13.0+cpu also
    # satisfies ==2.13.0 and sorts above it, so `make setup` constrained by this file still gets
    # PyPI's build, the one PyPI's torchvision is built against.
    pinned = sorted(
        f"{shown}{'===' if canonicalize_name(shown) == 'torch' else '=='}{version}"
        for shown, version, _ in resolved.values()
    )
    out.write_text("\n".join(lines + sorted(pinned, key=str.lower)) + "\n")
    print(f"wrote {out} ({len(pinned)} pins; torch from {torch_url.rsplit('/', 1)[-1]})")


def main(argv: list[str]) -> None:
    match argv:
        case ["cuda-lock", report, out, variant, min_driver]:
            cmd_cuda_lock(Path(report), Path(out), variant, min_driver)
        case ["split"]:
            cmd_split()
        case ["check"]:
            cmd_check()
        case ["check-cuda", path]:
            cmd_check_cuda(Path(path))
        case _:
            print(__doc__, file=sys.stderr)
            raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
