"""Fetch files over HTTP(S) and unpack archives without trusting either.

- ``download_file``: retries transient failures (connection errors, timeouts, a body cut
  short, HTTP 408/429/5xx) with exponential backoff; a 404 (or any other 4xx) moves on to
  the next mirror at once, and a checksum mismatch fails at once. The file appears under
  its final name only when complete and verified.
- ``extract_archive``: all or nothing. Members are unpacked into a temporary sibling of
  the target first; a truncated or hostile archive (``../`` or absolute member paths,
  links pointing outside, device files) raises and leaves the target folder as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Sequence

from tasks.io import file_digest, remove_stale_temporaries, swap_into_place

log = logging.getLogger(__name__)

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20
_sleep = time.sleep  # tests replace it to record the backoff


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names the URL and the file."""


class ArchiveError(ValueError):
    """An archive is truncated, corrupt or tries to write outside its target folder."""


class _Transient(Exception):
    """A failure worth another attempt."""


# --- checksums ------------------------------------------------------------------------------

def _expected(md5: str | None, sha256: str | None) -> tuple[str, str] | None:
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    return None


def matches_checksum(path: Path, md5: str | None = None, sha256: str | None = None) -> bool:
    """True when ``path`` is a file with the expected checksum (any file when none is given)."""
    expected = _expected(md5, sha256)
    return path.is_file() and (expected is None or file_digest(path, expected[0]) == expected[1])


# --- download -------------------------------------------------------------------------------
def download_file(urls: str | Sequence[str], dest: str | Path, *, md5: str | None = None,
                  sha256: str | None = None, attempts: int = 5, backoff_s: float = 1.0,
                  timeout_s: float = 60.0) -> Path:
    """Fetch the first of ``urls`` (mirrors, in order) that answers into ``dest``; returns ``dest``.

    An existing ``dest`` with the expected checksum is reused without any network access.
    Each URL gets up to ``attempts`` tries, sleeping ``backoff_s * 2**k`` after the k-th
    transient failure. Raises ``DownloadError`` naming every URL tried.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    expected = _expected(md5, sha256)
    if matches_checksum(dest, md5, sha256):
        log.info("%s already present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    failures = []
    for url in urls:
        try:
            actual = _fetch_with_retries(url, dest, expected, attempts, backoff_s, timeout_s)
        except DownloadError as err:
            failures.append(str(err))
            continue
        if expected is not None and actual != expected[1]:
            dest.unlink(missing_ok=True)
            raise DownloadError(f"{url}: checksum mismatch for {dest}: {expected[0]} {actual}, "
                                f"expected {expected[1]} (file removed)")
        log.info("downloaded %s -> %s", url, dest)
        return dest
    raise DownloadError("could not download " + dest.name + ":\n  " + "\n  ".join(failures))


def _fetch_with_retries(url: str, dest: Path, expected: tuple[str, str] | None, attempts: int,
                        backoff_s: float, timeout_s: float) -> str:
    """Download ``url`` to ``dest`` (retrying transient errors); returns the file's digest."""
    for attempt in range(attempts):
        try:
            return _fetch_once(url, dest, expected[0] if expected else "sha256", timeout_s)
        except urllib.error.HTTPError as err:
            if err.code not in TRANSIENT_HTTP:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason} (not retried)") from None
            problem = f"HTTP {err.code} {err.reason}"
        except _Transient as err:
            problem = str(err)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        if attempt + 1 == attempts:
            raise DownloadError(f"{url}: gave up after {attempts} attempts; last error: {problem}")
        delay = backoff_s * 2 ** attempt
        log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", url, problem, delay, attempt + 2, attempts)
        _sleep(delay)
    raise AssertionError("unreachable")


def _fetch_once(url: str, dest: Path, algorithm: str, timeout_s: float) -> str:
    """One GET into a temporary file renamed to ``dest`` only when the body is complete."""
    request = urllib.request.Request(url, headers={"User-Agent": "genai-pipeline"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    digest, received = hashlib.new(algorithm), 0
    try:
        with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            try:
                while chunk := response.read(_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
            except http.client.IncompleteRead as err:
                raise _Transient(f"connection closed after {received + len(err.partial)} bytes") from None
            if length is not None and received != int(length):
                raise _Transient(f"body has {received} bytes, Content-Length says {length}")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


# --- extraction -----------------------------------------------------------------------------
def extract_archive(archive: str | Path, target: str | Path) -> list[Path]:
    """Unpack ``archive`` (.tar[.gz|.bz2|.xz], .tgz, .zip or a single-file .gz) into ``target``.

    Returns the top-level paths written. On any error ``target`` is left exactly as it was.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _unpack(archive, staging)
        written = []
        for entry in sorted(staging.iterdir()):
            swap_into_place(entry, target / entry.name)
            written.append(target / entry.name)
        return written
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as err:
        raise ArchiveError(f"cannot unpack {archive}: {type(err).__name__}: {err} "
                           f"(truncated or corrupt; {target} was left as it was)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(archive: Path, staging: Path) -> None:
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                _check_member(archive, info.filename, _zip_link_target(zipped, info), device=False)
            for info in zipped.infolist():
                zipped.extract(info, staging)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")):
        with tarfile.open(archive) as tar:
            members = tar.getmembers()  # reads the whole index: a truncated archive fails here
            for member in members:
                link = member.linkname if member.issym() else None
                if member.islnk():  # hard links name a path relative to the archive root
                    _check_member(archive, member.linkname, None, device=False)
                _check_member(archive, member.name, link, device=not (member.isfile() or member.isdir()
                                                                      or member.issym() or member.islnk()))
            tar.extractall(staging, members=members, filter="data")
    elif name.endswith(".gz"):
        out = staging / archive.name[:-3]
        with gzip.open(archive, "rb") as source, open(out, "wb") as sink:
            shutil.copyfileobj(source, sink, _CHUNK)
    else:
        raise ArchiveError(f"{archive}: unknown archive type (expected .tar[.gz|.bz2|.xz], .tgz, .zip or .gz)")


def _zip_link_target(zipped: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return zipped.read(info).decode("utf-8", "replace")
    return None


def _check_member(archive: Path, name: str, link_target: str | None, device: bool) -> None:
    """Refuse members that would land outside the target folder (or are not plain data)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise ArchiveError(f"refusing to unpack {archive}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"refusing to unpack {archive}: member {name!r} points outside the target folder (..)")
    if device:
        raise ArchiveError(f"refusing to unpack {archive}: member {name!r} is a device, fifo or other special file")
    if link_target is not None:
        target = PurePosixPath(link_target.replace("\\", "/"))
        if target.is_absolute() or _escapes(path.parent / target):
            raise ArchiveError(f"refusing to unpack {archive}: link {name!r} -> {link_target!r} "
                               "points outside the target folder")


def _escapes(path: PurePosixPath) -> bool:
    """Whether a relative path climbs above its starting folder at any point."""
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False
