"""Stop a helper process when the process that started it dies, even by SIGKILL.

A process killed with SIGKILL runs no clean-up: the temporary Prefect server (uvicorn) that
``python -m flows.pipeline`` starts would run on under pid 1, holding its port and database.
``stop_with_this_process`` starts a small watchdog process, in its own session, that waits
for the starting process to go, then stops the helper (SIGTERM, SIGKILL after 5 s) and
exits. It also exits as soon as the helper ends by itself (a normal run stops its server).

    python flows/watchdog.py PARENT_PID CHILD_PID CHILD_CREATE_TIME
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 0.5


def stop_with_this_process(child_pid: int, what: str = "helper") -> subprocess.Popen:
    """Start a watchdog that stops process ``child_pid`` once this process is gone; returns it.

    The child is identified by pid *and* start time, so a reused pid is never signalled.
    """
    import psutil

    started = psutil.Process(child_pid).create_time()
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), str(child_pid),
                             repr(started), what], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _same_process(pid: int, started: float):
    import psutil

    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - started) < 0.01 else None
    except psutil.NoSuchProcess:
        return None


def watch(parent_pid: int, child_pid: int, child_started: float) -> int:
    """Wait until the parent or the child is gone; if the parent went first, stop the child."""
    import psutil

    child = _same_process(child_pid, child_started)
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        parent = None
    while child is not None and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        if parent is None or not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
            child.terminate()
            try:
                child.wait(timeout=5)
            except psutil.TimeoutExpired:
                child.kill()
            return 0
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
    except Exception:  # the child vanished between two checks: nothing left to do
        sys.exit(0)
