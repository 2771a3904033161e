"""One pipeline run per checkout: a second run is refused naming the holder; a holder that was
killed (SIGKILL) frees the lock, and the next run gets its record to mark its runs Crashed.

The Prefect side of marking runs Crashed is tested against a real server in
tests/test_orchestration.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from filelock import FileLock

import flows.run_lock as run_lock_module
from flows.run_lock import RUN_LOCK, RUN_RECORD, PipelineBusy, dvc_lock, run_lock
from tests.conftest import REPO_ROOT

HOLD_THE_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flows.run_lock import run_lock

    with run_lock(Path(sys.argv[1]), "flow-run-of-the-child"):
        Path(sys.argv[2]).touch()
        time.sleep(300)
""")


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the run lock of ``tmp_path``."""
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path), str(ready)],
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.02)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_run_in_the_same_checkout_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(PipelineBusy) as error:
        with run_lock(tmp_path, "second"):
            pytest.fail("a second run must not start")
    message = str(error.value)
    assert "another pipeline run is working" in message
    assert f"pid {holder.pid}" in message and "flow-run-of-the-child" in message
    assert json.loads((tmp_path / RUN_RECORD).read_text())["flow_runs"] == ["flow-run-of-the-child"]


def test_a_killed_holder_frees_the_lock_and_its_runs_are_handed_over_as_killed(tmp_path, holder, monkeypatch):
    found = []
    monkeypatch.setattr(run_lock_module, "mark_killed_runs",
                        lambda record, found_by: found.append((record, found_by)) or ["flow-run-of-the-child"])
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path, "next") as crashed:
        assert crashed == ["flow-run-of-the-child"]
        assert json.loads((tmp_path / RUN_RECORD).read_text())["flow_runs"] == ["next"]
    [(record, found_by)] = found
    assert record["flow_runs"] == ["flow-run-of-the-child"] and record["pid"] == holder.pid and found_by == "next"
    assert not (tmp_path / RUN_RECORD).exists()


def test_a_subflow_shares_the_lock_and_a_clean_exit_leaves_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock_module, "mark_killed_runs", lambda record, found_by: pytest.fail("nothing died"))
    with run_lock(tmp_path, "outer"):
        with run_lock(tmp_path, "inner"):
            assert json.loads((tmp_path / RUN_RECORD).read_text())["flow_runs"] == ["outer", "inner"]
        assert json.loads((tmp_path / RUN_RECORD).read_text())["flow_runs"] == ["outer"]
    assert not (tmp_path / RUN_RECORD).exists()
    other = FileLock(tmp_path / RUN_LOCK, thread_local=False)
    other.acquire(timeout=0)  # released
    other.release()


def test_the_dvc_lock_excludes_other_processes(tmp_path):
    probe = ("import sys; from filelock import FileLock, Timeout\n"
             "try:\n    FileLock(sys.argv[1]).acquire(timeout=0)\nexcept Timeout:\n    sys.exit(3)\n")
    path = tmp_path / ".dvc" / "tmp" / "pipeline-dvc.lock"
    with dvc_lock(tmp_path):
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0
