"""Small file helpers for steps: atomic writes, checksums, whole-directory replacement.

A step must never leave a half-written file or folder where DVC or a later step would
take it for finished output, so everything is written under a temporary name in the
same directory (same file system) and moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing; the previous output is unchanged."""

    def __str__(self) -> str:
        return self.strerror or "disk full"


def _disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _NO_SPACE


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
    atomic_write_files([(path, data)])


def atomic_write_files(files: Sequence[tuple[str | Path, bytes]]) -> None:
    """Write each ``(path, data)`` atomically; the renames happen only once every file is on disk.

    They are renamed in the given order, so a process killed between two renames leaves
    the later files' complete temporaries behind: a file and its checksum (written after
    it) can be repaired from them (``tasks.checkpoints.recover_interrupted_save``).
    A full disk raises ``DiskFullError`` naming the file; the previous files are unchanged.
    """
    staged: list[tuple[str, Path]] = []
    current, renamed = None, 0
    try:
        for path, data in files:
            current = path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp_name, path))
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; outputs should be readable like any file
        for tmp_name, path in staged:
            current = path
            os.replace(tmp_name, path)
            renamed += 1
    except BaseException as err:
        for tmp_name, _ in staged if not renamed else []:  # once renaming began, keep the rest for repair
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        if _disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(err.errno, f"disk full: no space left on device while writing {current}; "
                                f"the previous {Path(current).name} is unchanged", str(current)) from err
        raise
    for directory in dict.fromkeys(path.parent for _, path in staged):
        _fsync_directory(directory)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json_text(obj: Any) -> str:
    """The canonical JSON text used for every JSON file: sorted keys, indent 2, final newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (see ``to_json_text``) to ``path`` atomically."""
    atomic_write_text(path, to_json_text(obj))


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_size: int = 1 << 20) -> str:
    """Hex digest (any ``hashlib`` algorithm: ``sha256``, ``md5``, ...) of the file at ``path``."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    return file_digest(path, "sha256")


@contextlib.contextmanager
def replace_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final_dir``; on success swap it into place.

    If the ``with`` block raises, the temporary folder is removed and ``final_dir`` is
    left exactly as it was (a full disk raises ``DiskFullError`` naming ``final_dir``). On
    success the old ``final_dir`` (if any) is moved aside, the new one renamed into place,
    and only then is the old one deleted.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_dir)  # left by a writer of final_dir that was killed
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0700
        yield tmp_dir
        swap_into_place(tmp_dir, final_dir)
    except BaseException as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if _disk_full(err):
            raise DiskFullError(err.errno, f"disk full: no space left on device while writing {final_dir} "
                                f"({err.filename or 'a file in its temporary folder'}); "
                                f"the previous {final_dir} is unchanged", str(final_dir)) from err
        raise


def swap_into_place(new_dir: Path, final_dir: Path) -> None:
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


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Clean up after a writer of ``path`` that was killed: returns what was removed or restored.

    Removes the temporary names this module uses for ``path`` (``.NAME.XXXXXXXX.tmp`` files,
    ``.NAME.tmp-XXXXXXXX`` folders). A ``.NAME.old-XXXXXXXX`` left by a swap killed between
    its two renames is the previous output: it is put back if ``path`` is missing, else removed.
    Only ``path``'s own temporaries are touched, so concurrent writers of siblings are safe.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = re.escape(path.name)
    temporary = re.compile(rf"\.{name}\.(?:[a-z0-9_]{{8}}\.tmp|tmp-[a-z0-9_]{{8}})")
    previous = re.compile(rf"\.{name}\.old-[a-z0-9_]{{8}}")
    handled = []
    for entry in sorted(path.parent.iterdir()):
        if previous.fullmatch(entry.name) and not path.exists() and not path.is_symlink():
            os.replace(entry, path)
            log.warning("restored %s from %s (a replacement was interrupted)", path, entry.name)
        elif temporary.fullmatch(entry.name) or previous.fullmatch(entry.name):
            _remove(entry)
            log.info("removed stale temporary %s", entry)
        else:
            continue
        handled.append(entry)
    return handled


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)
