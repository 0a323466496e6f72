#!/usr/bin/env python3
"""Refuse credentials in files that git tracks (a pre-commit hook; standard library only).

    scripts/check-no-credentials.py [FILE ...]

With FILEs (what pre-commit passes: the staged files) checks those; without, every file
`git ls-files` lists. Exit status 1 and one line per finding, `path:line: what. Fix: how`, when
 - .dvc/config (the committed DVC config) sets a secret of a remote: access_key_id,
   secret_access_key, session_token, password, ... (they belong in .dvc/config.local or the
   environment),
 - .dvc/config.local itself is tracked,
 - any text file holds an AWS access key id (AKIA.../ASIA...) or assigns a literal value to an
   aws_secret_access_key / aws_secret_key.
A line containing `pragma: allowlist secret` is skipped (e.g. a documented fake key).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 5_000_000
ALLOW_PRAGMA = "pragma: allowlist secret"

# Keys of DVC remote sections that hold secrets (dvc/config_schema.py, all remote kinds).
DVC_SECRET_KEYS = frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "password",
        "passphrase",
        "token",
        "sas_token",
        "account_key",
        "connection_string",
        "client_secret",
        "gdrive_client_secret",
        "oss_key_id",
        "oss_key_secret",
        "sse_customer_key",
    }
)

AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])((?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Z0-9])")
# aws_secret_access_key = VALUE, AWS_SECRET_ACCESS_KEY: "VALUE", aws_secret_key=VALUE, ...
AWS_SECRET = re.compile(
    r"""(?i)(aws_?secret(?:_access)?_?key)["']?\s*(?:=|:|=>)\s*["']?([^\s"'`,;)}\]]*)"""
)
INI_SECTION = re.compile(r"^\s*\[(.+)\]\s*$")
INI_KEY = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*(.*?)\s*$")

FIX_ENV = (
    "keep credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or in the "
    "git-ignored .dvc/config.local ('scripts/remote.py credentials REMOTE')"
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}. Fix: {self.fix}"


def mask(secret: str) -> str:
    return f"{secret[:4]}...{secret[-2:]}" if len(secret) > 8 else "***"


def looks_like_literal_secret(value: str) -> bool:
    """True for a value that is a real secret, not a placeholder or a reference to one."""
    value = value.strip().strip("\"'")
    if len(value) < 20 or value[0] in "$<{%(":
        return False
    if value.lower().startswith(("os.environ", "os.getenv", "env.", "secrets.", "getenv")):
        return False
    return re.fullmatch(r"[A-Za-z0-9/+=_-]+", value) is not None


def is_dvc_config(path: Path) -> bool:
    return path.parent.name == ".dvc" and path.name == "config"


def is_dvc_local_config(path: Path) -> bool:
    return path.parent.name == ".dvc" and path.name == "config.local"


def check_dvc_config(path: Path, lines: list[str]) -> Iterator[Finding]:
    section = ""
    for number, line in enumerate(lines, 1):
        if ALLOW_PRAGMA in line:
            continue
        if m := INI_SECTION.match(line):
            section = m.group(1).strip()
            if len(section) > 1 and section[0] == section[-1] and section[0] in "'\"":
                section = section[1:-1]
            continue
        m = INI_KEY.match(line)
        if not m or m.group(1).lower() not in DVC_SECRET_KEYS or not m.group(2).strip("\"'"):
            continue
        key = m.group(1)
        remote = re.search(r'remote\s+"([^"]+)"', section)
        name = remote.group(1) if remote else "REMOTE"
        yield Finding(
            str(path),
            number,
            f"'{key}' of [{section}] is set in the committed DVC config",
            f"run 'dvc remote modify --unset {name} {key}' (or delete the line), rotate the "
            f"credential if this was ever pushed, and {FIX_ENV.replace('REMOTE', name)}",
        )


def check_text(path: Path, lines: list[str]) -> Iterator[Finding]:
    for number, line in enumerate(lines, 1):
        if ALLOW_PRAGMA in line:
            continue
        for m in AWS_KEY_ID.finditer(line):
            yield Finding(
                str(path),
                number,
                f"AWS access key id '{mask(m.group(1))}'",
                f"remove it, deactivate/rotate the key in IAM (treat it as leaked), and {FIX_ENV}",
            )
        for m in AWS_SECRET.finditer(line):
            if looks_like_literal_secret(m.group(2)):
                yield Finding(
                    str(path),
                    number,
                    f"{m.group(1)} is set to a literal secret '{mask(m.group(2))}'",
                    f"remove it, rotate the key (treat it as leaked), and {FIX_ENV}",
                )


def check_file(path: Path) -> list[Finding]:
    if is_dvc_local_config(path):
        return [
            Finding(
                str(path),
                1,
                ".dvc/config.local (per-clone settings and credentials) is tracked",
                "run 'git rm --cached .dvc/config.local' and keep '/config.local' in "
                ".dvc/.gitignore (dvc init puts it there); rotate any key it held",
            )
        ]
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_BYTES:
            return []
        data = path.read_bytes()
    except OSError:
        return []
    if b"\0" in data[:8192]:
        return []  # binary
    lines = data.decode("utf-8", errors="replace").splitlines()
    findings = list(check_text(path, lines))
    if is_dvc_config(path):
        config_findings = list(check_dvc_config(path, lines))
        seen = {f.line for f in config_findings}
        findings = [f for f in findings if f.line not in seen] + config_findings
    return sorted(findings, key=lambda f: f.line)


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], check=True, capture_output=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"check-no-credentials: cannot list tracked files with 'git ls-files': {e}")
    return [Path(p) for p in out.split("\0") if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="default: all git-tracked files")
    args = parser.parse_args(argv)
    files = args.files or tracked_files()
    findings = [f for path in files for f in check_file(path)]
    for finding in findings:
        print(finding, file=sys.stderr)
    if findings:
        print(
            f"check-no-credentials: {len(findings)} credential(s) found; nothing may be "
            "committed until they are removed (a line with 'pragma: allowlist secret' is "
            "ignored, for documented fake keys only).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
