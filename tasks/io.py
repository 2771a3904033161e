"""Small file helpers for steps: atomic writes, checksums, whole-directory replacement,
bounded reads of input files, and one-writer-at-a-time locks.

A step must never leave a half-written file or folder where DVC or a later step would
take it for finished output, so everything is written under a temporary name in the
same directory (same file system) and moved into place with ``os.replace``.

An input named by the user is read only if it is a regular file no larger than a cap: a
FIFO would block forever and ``/dev/zero`` never ends (``read_regular_file``).
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
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing; the previous output is unchanged."""

    def __str__(self) -> str:
        return self.strerror or "disk full"


class InputError(ValueError):
    """An input file is missing, not a regular file, or larger than its cap; the message names it."""


class OutputError(ValueError):
    """An output location cannot be written, or would lie outside the folder it must stay in."""


class Busy(RuntimeError):
    """Another process holds the lock on something this one needs to write; the message names it."""


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file of at most ``max_bytes``.

    The file is opened without blocking (a FIFO would otherwise wait for a writer forever)
    and its type is checked on the open descriptor, so a swap after the check cannot slip a
    device in. Raises ``InputError`` naming the file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except OSError as err:
        raise InputError(f"cannot open {path}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path} is not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise InputError(f"{path} is larger than the cap of {_size(max_bytes)} ({_size(info.st_size)})")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise InputError(f"{path} is larger than the cap of {_size(max_bytes)}")
        return b"".join(chunks)
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, expected a file") from None
    finally:
        os.close(fd)


def check_regular_file(path: str | Path, max_bytes: int) -> None:
    """``read_regular_file``'s checks without reading: exists, a regular file, at most ``max_bytes``."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path} is not a regular file ({_file_kind(info.st_mode)})")
    if info.st_size > max_bytes:
        raise InputError(f"{path} is larger than the cap of {_size(max_bytes)} ({_size(info.st_size)})")


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes} bytes"


def check_writable(folder: str | Path) -> None:
    """Prove a file can be written in ``folder`` (or, if it does not exist yet, in the ancestor it
    would be created in); else ``OutputError`` naming it. Creates nothing that stays.

    Called before long work, so a step does not train for an hour and then fail to save.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link where the folder should be
            raise OutputError(f"cannot write output folder {folder}: {existing} is a broken link; nothing was started")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write output folder {folder}: {existing} is not a folder; nothing was started")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write output folder {folder}: {err.strerror or err} in {existing}; "
                          "nothing was started") from None


@contextlib.contextmanager
def exclusive_lock(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an OS file lock (``flock``) on ``lock_file`` while ``what`` is being done.

    Never waits: when another process holds it, ``Busy`` names that process (pid, host and
    start time, which the holder writes into the lock file). The kernel releases the lock
    when the holder dies, even by SIGKILL, so a killed holder never blocks the next one.
    The holder removes the file when it is done (under the lock; an acquirer that locked a
    file already removed, or replaced, tries again), so no lock files are left lying about.
    """
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{what} is already in progress ({holder}); this one does not start "
                       f"(lock: {lock_file})") from None
        held = os.fstat(fd)
        try:
            current = os.stat(lock_file)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the holder before us removed (or replaced) this file: lock the one there now
    else:
        raise Busy(f"could not take the lock {lock_file} for {what}: it keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(fd)  # releases the lock


def output_lock_file(path: str | Path) -> Path:
    """The lock file that serializes writers of output ``path``: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


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

    One writer of ``final_dir`` at a time: a second one raises ``Busy`` naming the first
    (``.NAME.lock`` beside it), so it can never take a live writer's temporaries for a
    killed writer's leftovers and remove them.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output_lock_file(final_dir), f"writing {final_dir}"):
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
    Only ``path``'s own temporaries are touched, so concurrent writers of siblings are safe;
    the caller must hold ``path``'s writer lock (``replace_directory`` does), so no live writer
    of ``path`` itself owns them.
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
