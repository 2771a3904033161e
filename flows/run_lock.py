"""One pipeline run per checkout at a time; runs whose process was killed are marked Crashed.

Both locks are OS file locks (``filelock``: ``flock`` on POSIX), which the kernel releases
when the holder dies, even by SIGKILL, so a killed run never leaves a stale lock behind.

- The run lock, ``.runs/pipeline.lock``, is held by the process running a flow for the
  whole run (a subflow in the same process shares it). A second run in the same checkout,
  say a manual run during a scheduled one, fails at once with a message naming the holder.
  Beside it, ``.runs/pipeline-run.json`` records the holder: flow run ids, pid, host and
  start time. The record is removed when the run ends, so a record found by the next run
  that gets the lock was left by a process that died without finishing: the runs it names
  that the Prefect API still shows as Pending or Running (with their task runs) are set to
  Crashed, with a message saying which process is gone.
- The DVC lock, ``.dvc/tmp/pipeline-dvc.lock``, serializes ``dvc status`` and ``dvc commit``
  between the threads and processes (Dask workers) that run stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from tasks.io import atomic_write_json

log = logging.getLogger(__name__)

RUN_LOCK = Path(".runs/pipeline.lock")
RUN_RECORD = Path(".runs/pipeline-run.json")
DVC_LOCK = Path(".dvc/tmp/pipeline-dvc.lock")
UNFINISHED = {"PENDING", "RUNNING", "CANCELLING"}


class PipelineBusy(RuntimeError):
    """Another pipeline run holds this checkout's run lock."""


@dataclass
class _Holding:
    lock: FileLock
    record: dict
    flow_runs: list[str] = field(default_factory=list)


_HELD: dict[Path, _Holding] = {}
_GUARD = threading.Lock()
_DVC_THREADS = threading.Lock()


@contextlib.contextmanager
def dvc_lock(root: Path) -> Iterator[None]:
    """Hold the checkout's DVC lock: one ``dvc status``/``commit`` at a time, across processes."""
    path = Path(root) / DVC_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with _DVC_THREADS, FileLock(path, thread_local=False):
        yield


@contextlib.contextmanager
def run_lock(root: Path, flow_run_id: str | None) -> Iterator[list[str]]:
    """Hold the checkout's run lock during flow run ``flow_run_id``.

    Yields the ids of earlier runs found killed and marked Crashed. Raises ``PipelineBusy``
    when another process holds the lock.
    """
    root = Path(root).resolve()
    crashed = _enter(root, flow_run_id)
    try:
        yield crashed
    finally:
        _leave(root, flow_run_id)


def _enter(root: Path, flow_run_id: str | None) -> list[str]:
    with _GUARD:
        holding = _HELD.get(root)
        crashed: list[str] = []
        if holding is None:
            (root / RUN_LOCK).parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(root / RUN_LOCK, thread_local=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise PipelineBusy(_busy_message(root)) from None
            left_behind = read_record(root)  # only a holder that died leaves its record
            crashed = mark_killed_runs(left_behind, flow_run_id) if left_behind else []
            holding = _HELD[root] = _Holding(lock, {"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        holding.flow_runs.append(str(flow_run_id))
        atomic_write_json(root / RUN_RECORD, {**holding.record, "flow_runs": holding.flow_runs})
        return crashed


def _leave(root: Path, flow_run_id: str | None) -> None:
    with _GUARD:
        holding = _HELD[root]
        holding.flow_runs.remove(str(flow_run_id))
        if holding.flow_runs:
            atomic_write_json(root / RUN_RECORD, {**holding.record, "flow_runs": holding.flow_runs})
            return
        (root / RUN_RECORD).unlink(missing_ok=True)
        holding.lock.release()
        del _HELD[root]


def read_record(root: Path) -> dict | None:
    """The run record left in ``root``, if any (None when absent or unreadable)."""
    try:
        return json.loads((Path(root) / RUN_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _busy_message(root: Path) -> str:
    record = read_record(root) or {}
    holder = (f"flow run {', '.join(record.get('flow_runs', [])) or '?'} (pid {record.get('pid', '?')} "
              f"on {record.get('host', '?')}, started {record.get('started', '?')})")
    return (f"another pipeline run is working in {root}: {holder}; this run does not start. "
            f"Runs in one checkout never overlap (lock: {root / RUN_LOCK}).")


def mark_killed_runs(record: dict | None, found_by: str | None) -> list[str]:
    """Set the unfinished flow runs named in a dead holder's ``record`` (and their task runs) to Crashed."""
    if not record or not record.get("flow_runs"):
        return []
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = (f"the process running this flow (pid {record.get('pid')} on {record.get('host')}, started "
               f"{record.get('started')}) ended without reporting a result: it was killed or its machine "
               f"went down; marked Crashed by flow run {found_by}")
    crashed = []
    with get_client(sync_client=True) as client:
        for run_id in record["flow_runs"]:
            try:
                run = client.read_flow_run(run_id)
            except (ObjectNotFound, ValueError):  # another Prefect database, or not a run id
                continue
            if run.state is None or run.state.type.value not in UNFINISHED:
                continue
            client.set_flow_run_state(run_id, Crashed(message=message), force=True)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            for task_run in tasks:
                if task_run.state is not None and task_run.state.type.value in UNFINISHED:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            log.warning("flow run %s (%s) was left %s by a killed process: marked Crashed",
                        run.name, run_id, run.state.name)
            crashed.append(str(run_id))
    return crashed
