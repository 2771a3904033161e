"""Small file helpers for steps: atomic writes, checksums, whole-directory replacement.

A step must never leave a half-written file or folder where DVC or a later step would
take it for finished output, so everything is written under a temporary name in the
same directory (same file system) and moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; outputs should be readable like any file
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json_text(obj: Any) -> str:
    """The canonical JSON text used for every JSON file: sorted keys, indent 2, final newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (see ``to_json_text``) to ``path`` atomically."""
    atomic_write_text(path, to_json_text(obj))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def replace_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final_dir``; on success swap it into place.

    If the ``with`` block raises, the temporary folder is removed and ``final_dir`` is
    left exactly as it was. On success the old ``final_dir`` (if any) is moved aside,
    the new one renamed into place, and only then is the old one deleted.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0700
        yield tmp_dir
        _swap_into_place(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _swap_into_place(new_dir: Path, final_dir: Path) -> None:
    """Rename ``new_dir`` to ``final_dir``, deleting the old ``final_dir`` only afterwards."""
    if not final_dir.exists() and not final_dir.is_symlink():
        os.replace(new_dir, final_dir)
        _fsync_directory(final_dir.parent)
        return
    old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
    os.rmdir(old_dir)  # only the unique name is wanted; os.replace needs it free
    os.replace(final_dir, old_dir)
    try:
        os.replace(new_dir, final_dir)
    except BaseException:
        os.replace(old_dir, final_dir)  # put the old output back
        raise
    _fsync_directory(final_dir.parent)
    if old_dir.is_dir() and not old_dir.is_symlink():
        shutil.rmtree(old_dir)
    else:
        old_dir.unlink()
