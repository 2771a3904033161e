"""Stop what a process started when that process dies, even by SIGKILL.

A process killed with SIGKILL runs no clean-up: the temporary Prefect server (uvicorn) that
``python -m flows.pipeline`` starts, or a local Dask cluster's workers, would run on under
pid 1. ``stop_children_with_this_process`` starts a small watchdog process, in its own
session, that notes the starting process's descendants every ``POLL_SECONDS`` while it
lives, and once it is gone stops those still running (SIGTERM, SIGKILL after 5 s), then
exits. A process is recognised by pid *and* start time, so a reused pid is never signalled.
A helper started less than ``POLL_SECONDS`` before the kill can be missed.

    python flows/watchdog.py PARENT_PID PARENT_START_TIME
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 0.25


def stop_children_with_this_process() -> subprocess.Popen:
    """Start the watchdog of this process's descendants; returns its process."""
    import psutil

    started = psutil.Process().create_time()
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), repr(started)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def watch(parent_pid: int, parent_started: float) -> None:
    """Track ``parent_pid``'s descendants while it runs; when it is gone, stop those left."""
    import psutil

    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    if abs(parent.create_time() - parent_started) > 0.01:
        return  # not the process that started us
    known: dict[tuple[int, float], psutil.Process] = {}
    while True:
        try:
            if parent.status() == psutil.STATUS_ZOMBIE:
                break
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                if child.pid != os.getpid():
                    known.setdefault((child.pid, child.create_time()), child)
            except psutil.NoSuchProcess:
                pass
        known = {key: process for key, process in known.items() if process.is_running()}
        time.sleep(POLL_SECONDS)
    left = [process for process in known.values() if process.is_running()]  # is_running checks the start time
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still_running = psutil.wait_procs(left, timeout=5)
    for process in still_running:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
