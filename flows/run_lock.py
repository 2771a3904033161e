"""One pipeline run per checkout at a time; runs whose process was killed are marked Crashed.

Both locks are OS file locks (``filelock``: ``flock`` on POSIX), which the kernel releases
when the holder dies, even by SIGKILL, so a killed run never leaves a stale lock behind.

- The run lock, ``.runs/pipeline.lock``, is held by the process running a flow for the
  whole run (a subflow in the same process shares it). A second run in the same checkout,
  say a manual run during a scheduled one, fails at once with a message naming the holder.
  ``python -m flows.pipeline`` takes it before it starts a Prefect server, so a refused
  run starts nothing and records nothing.
- Stage commands (``python -m flows.cli ...``, which ``dvc repro`` runs) take the same lock
  *shared* (``stage_lock``): stage commands may run side by side (each output folder and
  each family's training state has its own lock, see ``tasks.io.exclusive_lock``), but
  never beside a flow run, unless they are that flow's own stages (the flow passes its run
  id in ``GENAI_PIPELINE_FLOW_RUN``). Each records itself in ``.runs/stages/``.
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
STAGE_RECORDS = Path(".runs/stages")  # one <host>-<pid>.json per stage command holding the lock shared
DVC_LOCK = Path(".dvc/tmp/pipeline-dvc.lock")
UNFINISHED = {"PENDING", "RUNNING", "CANCELLING"}
FLOW_RUN_ENV = "GENAI_PIPELINE_FLOW_RUN"  # set by the flow for its stage commands: the run they belong to


class PipelineBusy(RuntimeError):
    """Another pipeline run holds this checkout's run lock."""


@dataclass
class _Holding:
    lock: FileLock
    record: dict
    flow_runs: list[str] = field(default_factory=list)
    users: int = 0          # run_lock and reserve contexts in this process holding it
    checked: bool = False   # whether a dead holder's record has been looked at


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


@contextlib.contextmanager
def reserve(root: Path) -> Iterator[None]:
    """Take the checkout's run lock before the flow starts, so a refused run starts no Prefect server.

    The flow's own ``run_lock`` inside then shares it (and marks a dead holder's runs Crashed).
    Raises ``PipelineBusy`` when another process holds it.
    """
    root = Path(root).resolve()
    with _GUARD:
        _acquire(root).users += 1
    try:
        yield
    finally:
        with _GUARD:
            _release(root)


def _acquire(root: Path) -> _Holding:
    """This process's hold on ``root``'s run lock, taken now if not yet held (call under _GUARD)."""
    holding = _HELD.get(root)
    if holding is None:
        (root / RUN_LOCK).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / RUN_LOCK, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise PipelineBusy(_busy_message(root)) from None
        holding = _HELD[root] = _Holding(lock, {"pid": os.getpid(), "host": socket.gethostname(),
                                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return holding


def _release(root: Path) -> None:
    holding = _HELD[root]
    holding.users -= 1
    if holding.users == 0:
        holding.lock.release()
        del _HELD[root]


def _enter(root: Path, flow_run_id: str | None) -> list[str]:
    with _GUARD:
        holding = _acquire(root)
        holding.users += 1
        try:
            crashed: list[str] = []
            if not holding.checked:
                left_behind = read_record(root)  # only a holder that died leaves its record
                crashed = mark_killed_runs(left_behind, flow_run_id) if left_behind else []
                holding.checked = True
            holding.flow_runs.append(str(flow_run_id))
            atomic_write_json(root / RUN_RECORD, {**holding.record, "flow_runs": holding.flow_runs})
        except BaseException:
            if str(flow_run_id) in holding.flow_runs:
                holding.flow_runs.remove(str(flow_run_id))
            _release(root)
            raise
        return crashed


def _leave(root: Path, flow_run_id: str | None) -> None:
    with _GUARD:
        holding = _HELD[root]
        holding.flow_runs.remove(str(flow_run_id))
        if holding.flow_runs:
            atomic_write_json(root / RUN_RECORD, {**holding.record, "flow_runs": holding.flow_runs})
        else:
            (root / RUN_RECORD).unlink(missing_ok=True)
        _release(root)


@contextlib.contextmanager
def stage_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the checkout's run lock shared while one stage command runs (``dvc repro``, ``flows.cli``).

    Stage commands may run side by side; a flow run may not start meanwhile, nor may a stage
    command start during a flow run, except the flow's own stages (``FLOW_RUN_ENV`` names a
    run in the holder's record). Raises ``PipelineBusy`` naming the holder.
    """
    import fcntl

    root = Path(root).resolve()
    (root / RUN_LOCK).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / RUN_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        locked = True
    except BlockingIOError:
        os.close(fd)
        locked = False
    if not locked:
        flow_run = os.environ.get(FLOW_RUN_ENV)
        if not (flow_run and flow_run in (read_record(root) or {}).get("flow_runs", [])):
            raise PipelineBusy(_busy_message(root))
        yield  # one of the running flow's own stages: the flow holds the lock for it
        return
    record = root / STAGE_RECORDS / f"{socket.gethostname()}-{os.getpid()}.json"
    try:
        atomic_write_json(record, {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield
    finally:
        record.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def read_record(root: Path) -> dict | None:
    """The run record left in ``root``, if any (None when absent or unreadable)."""
    try:
        return json.loads((Path(root) / RUN_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(record: dict) -> bool:
    """Whether the process a record names may still run (only a local pid can be checked)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _stage_records(root: Path) -> list[dict]:
    records = []
    for path in sorted((Path(root) / STAGE_RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and _alive(record):
            records.append(record)
    return records


def _busy_message(root: Path) -> str:
    stages = _stage_records(root)
    if stages:
        holder = "; ".join(f"stage command `{r.get('command', '?')}` (pid {r.get('pid', '?')} on {r.get('host', '?')}, "
                           f"started {r.get('started', '?')})" for r in stages[:3])
    else:
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
