"""`pcam download`: PCAM files over HTTP(S), resumable, md5-verified, renamed into place when
good."""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pcam_pipeline.data.pcam import all_file_names, checksums_from
from pcam_pipeline.dvc.state import known_hashes
from pcam_pipeline.errors import NoSpace, PipelineError
from pcam_pipeline.params import FetchParams
from pcam_pipeline.paths import RAW_DIR
from pcam_pipeline.repro import (
    HASH_BLOCK,
    atomic_path,
    human_bytes,
    md5_file,
    mount_point,
    nearest_existing,
    require_free_space,
    write_failed,
)

log = logging.getLogger(__name__)


class DownloadError(PipelineError):
    """A file could not be fetched or did not match its published checksum."""


SPACE_FIX = "free space there (or download to a larger file system with `pcam download --dir`)"


def _md5_of_prefix(path: Path) -> hashlib._Hash:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest


def fetch_resumable(
    url: str,
    partial: Path,
    *,
    attempts: int = 5,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Stream `url` into `partial`, resuming from its current size; return the md5 of the whole.

    A dropped connection is retried (up to `attempts` times) with an HTTP Range request from the
    last byte received, so a multi-GB transfer survives network hiccups and an interrupted run
    continues where it stopped.
    """
    for attempt in range(1, attempts + 1):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:
                    log.info("%s: server ignored the resume request, starting over", url)
                    have = 0
                remaining = response.headers.get("Content-Length")
                if remaining is not None:
                    # Starting over frees what the partial file holds.
                    held = partial.stat().st_size if partial.exists() and not have else 0
                    require_free_space(partial, int(remaining) - held, SPACE_FIX)
                digest = _md5_of_prefix(partial) if have else hashlib.md5()
                with open(partial, "ab" if have else "wb") as out:
                    while block := response.read(HASH_BLOCK):
                        out.write(block)
                        digest.update(block)
                        if progress:
                            progress(len(block))
                expected = response.headers.get("Content-Length")
                if expected is not None and partial.stat().st_size != have + int(expected):
                    raise ConnectionError("connection closed before the end of the body")
                return digest.hexdigest()
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # asked past the end: the partial file is already whole
                return _md5_of_prefix(partial).hexdigest()
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # no retry frees space
                raise disk_full(partial, exc) from None
            if attempt == attempts:
                raise DownloadError(
                    f"{url}: failed after {attempts} attempts ({exc}); the partial file "
                    f"{partial} is kept: run the same command again to resume"
                ) from exc
            log.warning("%s: %s; resuming (attempt %d of %d)", url, exc, attempt + 1, attempts)
            time.sleep(min(2**attempt, 30) * 0.1)
    raise AssertionError("unreachable")


def disk_full(partial: Path, error: OSError) -> NoSpace:
    holder = nearest_existing(partial)
    return NoSpace(
        f"{partial}: the file system at {mount_point(holder)} "
        f"({human_bytes(shutil.disk_usage(holder).total)} in all) filled up during the download "
        f"({error.strerror}); the partial download is kept. Fix: {SPACE_FIX}, then run the same "
        "command again to resume"
    )


def gunzip_verified(source: Path, final: Path, expected_md5: str | None) -> str:
    """Unpack `source` into `final` via a temporary name, keeping it only if its md5 (computed
    as the bytes are written, not by reading the file again) matches; return the md5."""
    digest = hashlib.md5()
    with atomic_path(final) as tmp:
        try:
            with gzip.open(source, "rb") as packed, open(tmp, "wb") as out:
                while block := packed.read(HASH_BLOCK):
                    out.write(block)
                    digest.update(block)
        except OSError as exc:
            if exc.errno is None:  # gzip's own error: the download is damaged, not the disk
                raise
            fix = (
                f"{SPACE_FIX}, then run the same command again: it unpacks the download it kept, "
                f"{source}, without fetching it again"
            )
            raise write_failed(final, exc, fix) from None
        actual = digest.hexdigest()
        if expected_md5 is not None and actual != expected_md5:
            raise DownloadError(
                f"{final.name}: unpacked md5 {actual} != published {expected_md5}; nothing was "
                f"written to {final}. Fix: delete {source} and download again"
            )
    return actual


def download_pcam_file(
    base_url: str,
    name: str,
    target_dir: Path,
    h5_md5: str | None,
    gz_md5: str | None,
    *,
    attempts: int = 5,
) -> Path:
    """Fetch `<base_url>/<name>.gz`, verify it and the unpacked .h5, leave `<target_dir>/<name>`.

    An existing file that already matches `h5_md5` is kept and nothing is downloaded. Inside a
    DVC repository the md5 of the unpacked file is recorded in DVC's state (`dvc_state`), so
    that `dvc commit data.dvc` and fetch take it from there instead of hashing the file again.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / name
    if final.exists() and h5_md5 is not None:
        with known_hashes(target_dir) as known:
            if (known.md5(final) or md5_file(final)) == h5_md5:
                log.info("%s: present and verified", final)
                return final
    partial = target_dir / f".{name}.gz.part"
    url = f"{base_url.rstrip('/')}/{name}.gz"
    log.info("downloading %s", url)
    actual = fetch_resumable(url, partial, attempts=attempts)
    if gz_md5 is not None and actual != gz_md5:
        partial.unlink()
        raise DownloadError(
            f"{url}: md5 {actual} != published {gz_md5}; the corrupt download was deleted and "
            f"nothing was written to {final}. Fix: run the download again; if it repeats, check "
            "fetch.zenodo_url and fetch.checksums in params.yaml"
        )
    try:
        md5 = gunzip_verified(partial, final, h5_md5)
    except NoSpace:
        raise  # the verified download is kept: the next run unpacks it without fetching again
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.unlink(missing_ok=True)
    with known_hashes(target_dir) as known:
        known.record(final, md5)
    return final


def download_release(params: FetchParams, target_dir: Path = RAW_DIR) -> list[Path]:
    """`pcam download`: the official files (or fetch.zenodo_url's) into data/raw, verified."""
    h5_md5, gz_md5 = checksums_from(params.checksums)
    return [
        download_pcam_file(
            params.zenodo_url, name, target_dir, h5_md5.get(name), gz_md5.get(f"{name}.gz")
        )
        for name in all_file_names()
    ]
