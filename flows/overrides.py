"""The params of one run: ``-S key=value`` overrides and ``--params FILE``, applied as ``dvc exp run -S`` does.

Every stage reads ``params.yaml`` (``python -m flows.cli``), and DVC records the params of each
stage from that file into ``dvc.lock``. So for the stages to see an override, and for ``dvc.lock``
and the recorded run to say what really ran, the run's params must *be* ``params.yaml`` while the
run works. The flow therefore, under the checkout's run lock:

1. keeps the checkout's own ``params.yaml`` in ``.runs/params-before-run.yaml``;
2. writes the run's params into ``params.yaml`` (the override grammar and the YAML writer are DVC's
   own, ``dvc.utils.hydra.apply_overrides``: comments and layout are kept);
3. runs the stages and records the run (its DVC experiment holds the params it ran with);
4. puts the checkout's ``params.yaml`` back, whether the run succeeded or failed.

Afterwards ``dvc.lock`` and the outputs are those of the overridden run, so ``dvc status`` shows the
overridden stages as changed and the next run (or ``dvc repro``) brings them back to ``params.yaml``.
To keep an override, ``dvc exp apply <run>``, or edit ``params.yaml``. A run killed before step 4
leaves the backup behind; the next run puts it back, unless ``params.yaml`` was edited in between
(then it says so and leaves both files alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from tasks.config import ParamsError, PipelineConfig, load_params
from tasks.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
BACKUP = Path(".runs/params-before-run.yaml")
WRITTEN = Path(".runs/params-of-run.sha256")  # sha256 of what the run wrote into params.yaml


def run_params(root: Path, params_file: str | Path = PARAMS, overrides: Sequence[str] = ()) -> str | None:
    """The text ``params.yaml`` must hold during this run, or None when that is ``params.yaml`` as it is.

    ``params_file`` is the base (default ``params.yaml``); ``overrides`` are ``dvc exp run -S``
    patterns applied to it (``key=value``, ``+key=value`` to add, ``~key`` to delete). Raises
    ``ParamsError`` naming the file or the override.
    """
    root = Path(root)
    source = root / params_file
    if not source.is_file():
        raise ParamsError(f"{params_file}: file not found (--params names a file relative to {root})")
    if not overrides and source.resolve() == (root / PARAMS).resolve():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_bytes(source.read_bytes())
        if overrides:
            _apply(copy, list(overrides), params_file)
        return copy.read_text()


def _apply(path: Path, overrides: list[str], params_file: str | Path) -> None:
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides

    for override in overrides:  # one at a time, so an error names the one that failed
        try:
            apply_overrides(path, [override])
        except DvcException as err:
            cause = "; ".join(line.strip() for line in str(err.__cause__ or err).splitlines()
                              if line.strip() and not line.startswith("See https"))
            raise ParamsError(f"-S {override}: {cause} (in {params_file}; the syntax is dvc exp run -S's: "
                              "key=value, +key=value adds a key, ~key removes one)") from None


def load_run_params(root: Path, text: str | None, params_file: str | Path = PARAMS,
                    overrides: Sequence[str] = ()) -> PipelineConfig:
    """Validate the run's params (``text`` from ``run_params``; None: ``params.yaml`` itself)."""
    if text is None:
        return load_params(Path(root) / params_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text)
        try:
            return load_params(path)
        except ParamsError as err:
            described = f"{params_file}" + (f" with -S {' -S '.join(overrides)}" if overrides else "")
            raise ParamsError(str(err).replace(str(path), described)) from None


@contextlib.contextmanager
def params_in_place(root: Path, text: str | None) -> Iterator[None]:
    """Hold ``text`` in ``params.yaml`` for the duration; the checkout's own file comes back afterwards.

    Call it under the run lock (no other run may see or change params.yaml meanwhile).
    """
    if text is None:
        yield
        return
    root = Path(root)
    target, backup, written = root / PARAMS, root / BACKUP, root / WRITTEN
    atomic_write_bytes(backup, target.read_bytes() if target.exists() else b"")
    atomic_write_text(written, _digest(text.encode()) + ("" if target.exists() else " absent"))
    atomic_write_text(target, text)
    log.info("params.yaml holds this run's params until it ends (the checkout's own: %s)", BACKUP)
    try:
        yield
    finally:
        _put_back(root)
        log.info("params.yaml is the checkout's own again")


def restore_left_behind(root: Path) -> str | None:
    """After a run that was killed while it held other params: put the checkout's ``params.yaml`` back.

    Returns what was done (for the log), or None when nothing was left behind.
    """
    root = Path(root)
    target, backup, written = root / PARAMS, root / BACKUP, root / WRITTEN
    if not backup.exists():
        return None
    mark = written.read_text().split() if written.exists() else []
    current = _digest(target.read_bytes()) if target.exists() else None
    if mark and mark[0] == current:
        _put_back(root)
        return (f"an earlier run was stopped while params.yaml held its -S/--params values: the checkout's own "
                f"params.yaml is back (from {BACKUP})")
    return (f"an earlier run was stopped while params.yaml held its -S/--params values, and params.yaml has been "
            f"edited since: it is left as it is; the params it replaced are in {BACKUP} (delete that file once "
            f"you have checked)")


def _put_back(root: Path) -> None:
    target, backup, written = root / PARAMS, root / BACKUP, root / WRITTEN
    absent = written.exists() and written.read_text().endswith(" absent")
    if absent:
        target.unlink(missing_ok=True)
        backup.unlink()
    else:
        os.replace(backup, target)
    written.unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
