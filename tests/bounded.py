"""Run a command with a memory ceiling and a time limit, and measure what it really used.

For tests that feed hostile input to the real entry points: a run that would hang is
killed at ``timeout``; a run that would eat the machine's memory hits an address-space
limit instead (and fails with MemoryError); the peak resident memory of that one child
(``os.wait4``'s rusage, not the sum over every child this test process ever had) is
returned, so a test can assert a ceiling.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

GiB = 2**30
# ``import torch`` (the CUDA build) maps ~3.1 GiB of address space before doing anything; the
# address-space limit is that plus the memory a step may really use.
ADDRESS_SPACE = 3 * GiB + 1 * GiB + GiB // 2


@dataclass
class Finished:
    returncode: int          # negative: killed by that signal
    stdout: str
    stderr: str
    peak_rss_bytes: int
    seconds: float
    timed_out: bool

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def child_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment without outside Prefect/pipeline settings; one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GENAI_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_bounded(args: list[str], cwd: Path, timeout: float = 60.0, address_space: int = ADDRESS_SPACE,
                env: dict[str, str] | None = None) -> Finished:
    """Run ``args`` (a Python module's argv after ``python -m``, or any argv) with limits."""
    argv = [sys.executable, "-m", *args] if not os.path.isabs(args[0]) else list(args)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        os.setsid()  # its own process group: a timeout kills what it started too

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env or child_env(), stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, preexec_fn=limit)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Finished(process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        usage.ru_maxrss * 1024, seconds, timed_out.is_set())


def assert_one_line_error(result: Finished, *expected: str, max_length: int = 600) -> str:
    """Exit 2, exactly one ``error:`` line naming ``expected``, short, no traceback; returns the line."""
    assert not result.timed_out, f"hung (killed after {result.seconds:.0f} s):\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    [line] = result.error_lines
    assert len(line) <= max_length, f"error line of {len(line)} characters: {line[:300]}..."
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line
