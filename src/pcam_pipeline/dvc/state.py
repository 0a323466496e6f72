"""The md5s DVC already knows: its state database, so that no byte is hashed twice.

DVC keeps, per repository, the md5 of every file it has hashed, keyed by the file's path and
valid while its inode, mtime and size stay the same (dvc-data's `State`, the `hashes` table
under the site cache directory). Under `dvc repro` a stage can read there the md5 DVC has just
computed for one of its dependencies instead of reading the file again, and record the md5 of
an output it made as a hard link of a file it verified, which has that file's inode, mtime and
size: DVC then takes the output's md5 from the state instead of hashing the same bytes again.

Outside a DVC repository (or with DVC's state turned off) nothing is known and nothing is
recorded: the callers hash for themselves, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class KnownHashes:
    """md5s from and into the state database of the DVC repository at `root`, if any."""

    def __init__(self, state: Any | None) -> None:
        self._state = state
        if state is not None:
            from dvc_objects.fs import LocalFileSystem

            self._fs = LocalFileSystem()

    @property
    def active(self) -> bool:
        return self._state is not None

    def md5(self, path: Path) -> str | None:
        """The md5 DVC recorded for `path`, if the file has not changed since."""
        if self._state is None:
            return None
        _, hash_info = self._state.get(os.path.abspath(path), self._fs)
        if hash_info is None or hash_info.name != "md5" or hash_info.isdir:
            return None
        return str(hash_info.value)

    def file_info(self, path: Path) -> dict[str, Any] | None:
        """`path` as DVC's state keys it (inode, mtime, size), to take before hashing the file:
        a record made with it (`record(..., as_of=...)`) holds only if the file has not changed
        since."""
        if self._state is None:
            return None
        return dict(self._fs.info(os.path.abspath(path)))

    def record(self, path: Path, md5: str, as_of: dict[str, Any] | None = None) -> None:
        """Tell DVC that `path` has content md5 `md5`: as it is now, or as it was when
        `file_info` gave `as_of`."""
        if self._state is None:
            return
        from dvc_data.hashfile.hash_info import HashInfo

        self._state.save(os.path.abspath(path), self._fs, HashInfo("md5", md5), as_of)


NOTHING_KNOWN = KnownHashes(None)


@contextlib.contextmanager
def known_hashes(root: Path = Path(".")) -> Iterator[KnownHashes]:
    """KnownHashes of the DVC repository that holds the directory `root`; an empty one when
    none does (a file outside every repository is none of DVC's business)."""
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
    except ImportError:  # DVC is a runtime dependency, but a stage must not need it to run
        yield KnownHashes(None)
        return
    try:
        repo = Repo(os.fspath(root))
    except NotDvcRepoError:
        yield KnownHashes(None)
        return
    try:
        state = repo.state
        yield KnownHashes(state if getattr(state, "hashes", None) is not None else None)
    finally:
        repo.close()
