"""Property test (Hypothesis): whatever ``params.yaml`` holds, ``check`` and every stage command
either accept it or stop with exit status 2 and one ``error:`` line naming the key, value or
file. Never a traceback, never a hang, never more than a bounded amount of memory.

Generated inputs start from a valid tiny ``params.yaml`` and break it: a value replaced by a
wrong type, NaN or infinity, a huge or negative number, a numeric or boolean string, a deep
list; or the file's text broken: a YAML alias bomb, nesting 100,000 deep, a duplicated line
(duplicate keys), non-UTF-8 bytes, a cut-off file.

Every stage runs through the real entry point, ``flows.cli.main``, with ``--dry-run`` (all of
the stage's own checks, then stop: an accepted input is not trained on). The calls run in
one worker process, started once, so ``import torch`` is paid once; it has an address-space
limit of what it had after its imports plus 1 GiB, so a runaway allocation fails there
instead of eating the machine, and the test asserts that no call raises the worker's resident
memory by ``CALL_RSS_CEILING`` or more (the peak is reset before every call, so a failing example
is the one that used the memory). A call that takes longer than ``CALL_TIMEOUT`` is a hang.
"""

from __future__ import annotations

import copy
import json
import math
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.bounded import GiB, child_env
from tests.test_train import tiny_params

CALL_RSS_CEILING = GiB // 2  # resident memory one call may add to what the worker held before it
CALL_TIMEOUT = 30.0
EXAMPLES = 50
FAMILIES = list(tiny_params()["families"])

WORKER = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time, traceback
    import psutil
    from flows import cli
    import flows.run_lock, tasks.train, tasks.report, tasks.data, tasks.checkpoints  # what the stages import
    headroom = int(sys.argv[1])
    baseline = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (baseline + headroom, baseline + headroom))
    print(json.dumps({"ready": True}), flush=True)
    def reset_peak():  # Linux: VmHWM (the peak RSS) restarts at the current RSS, so each call has its own peak
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

    for line in sys.stdin:
        request = json.loads(line)
        reset_peak()
        held = status("VmRSS")
        err, crash, started = io.StringIO(), "", time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                if "allocate" in request:  # the harness's own check: a runaway allocation is caught
                    rc = len(bytearray(request["allocate"])) and 0
                else:
                    rc = cli.main(request["argv"])
        except BaseException:  # anything escaping main would reach the user as a traceback
            rc, crash = -1, traceback.format_exc()
        print(json.dumps({"rc": rc, "stderr": err.getvalue()[-4000:], "crash": crash[-4000:],
                          "seconds": time.perf_counter() - started,
                          "call_rss": status("VmHWM") - held}), flush=True)
""")


class Worker:
    """One long-lived process that runs ``flows.cli.main(argv)`` per request, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(GiB)], cwd=folder, env=child_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, bufsize=1)
        assert self._reply(120).get("ready"), "the worker did not start"

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            raise AssertionError(f"hang: no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the worker died (exit {self.process.wait()}), e.g. killed for memory")
        return json.loads(line)

    def call(self, argv: list[str] | None = None, allocate: int | None = None) -> dict:
        request = {"argv": argv} if allocate is None else {"allocate": allocate}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply(CALL_TIMEOUT)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with prepared tiny image and text data, for the stages that read them, and a
    ``model.pt`` placeholder per family (what ``evaluate``'s checks look for; a dry run reads none)."""
    from tasks import paths
    from tasks.config import parse_params
    from tasks.data import prepare_images, prepare_text

    folder = tmp_path_factory.mktemp("fuzz")
    config = parse_params(tiny_params())
    previous = Path.cwd()
    os.chdir(folder)
    try:
        prepare_images(config.data.images, config.seed, paths.IMAGE_DATA)
        prepare_text(config.data.text, config.seed, paths.TEXT_DATA)
    finally:
        os.chdir(previous)
    for family in FAMILIES:
        (folder / "models" / family).mkdir(parents=True)
        (folder / "models" / family / "model.pt").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def worker(workspace):
    started = Worker(workspace)
    yield started
    started.close()


# --- generated inputs --------------------------------------------------------------------------------
def leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of ``tree``: leaves and sub-mappings alike."""
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += leaf_paths(value, (*prefix, key))
    return paths


BASE = tiny_params()
PATHS = leaf_paths(BASE)

hostile_values = st.one_of(
    st.integers(min_value=1, max_value=5000), st.floats(min_value=0.0, max_value=1.0),  # plausible: stages' own checks
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, 10**12, 10**30, 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 1e12, 0.5]),
    st.sampled_from(["20", "yes", "no", "1e3", "", "null", "auto", "inf", "nan", "0x10", "../params.yaml",
                     "/dev/zero", "reports/x.html", "../../etc/passwd", "models", "é", "\x00"]),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.sampled_from(["a", "steps", "path", "model"]), st.integers(0, 3), max_size=2),
    st.recursive(st.integers(0, 3), lambda inner: st.lists(inner, min_size=1, max_size=2), max_leaves=8),
)


def alias_bomb(levels: int, width: int) -> str:
    items = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@st.composite
def broken_params(draw) -> tuple[bytes, str]:
    """(params.yaml bytes, the key path changed or '' for a change to the text as a whole)."""
    params = copy.deepcopy(BASE)
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["value", "value", "value", "bomb", "deep", "duplicate", "bytes", "cut"]))
    block = params
    for key in path[:-1]:
        block = block[key]
    marker = "@@MARK@@"
    if kind == "value":
        block[path[-1]] = draw(hostile_values)
    else:
        block[path[-1]] = marker
    text = yaml.safe_dump(params, sort_keys=False, allow_unicode=True, width=10**6)
    if kind == "bomb":
        text = text.replace(f"'{marker}'", marker).replace(marker, alias_bomb(draw(st.integers(2, 12)),
                                                                             draw(st.integers(2, 10))))
    elif kind == "deep":
        depth = draw(st.sampled_from([MAX_DEPTH_EDGE, MAX_DEPTH_EDGE + 1, 1000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        text = text.replace(f"'{marker}'", marker).replace(marker, opener * depth + "1" + closer * depth)
    else:
        text = text.replace(f"'{marker}'", "1").replace(marker, "1")
    data = text.encode()
    lines = data.split(b"\n")
    if kind == "duplicate":
        at = draw(st.integers(0, len(lines) - 1))
        lines.insert(at, lines[at])
        data = b"\n".join(lines)
    elif kind == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    return data, ".".join(map(str, path)) if kind == "value" else ""


MAX_DEPTH_EDGE = 60  # just inside the loader's nesting limit (64), counting the enclosing mappings


def stages_for(key: str, family: str) -> list[list[str]]:
    """``check`` and every stage kind; the train/evaluate stages of the family the key belongs to."""
    if key.startswith("families."):
        family = key.split(".")[1]
    return [["check"], ["--dry-run", "prepare", "image"], ["--dry-run", "prepare", "text"],
            ["--dry-run", "features"], ["--dry-run", "train", family], ["--dry-run", "evaluate", family],
            ["--dry-run", "report"]]


# --- the property ------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=broken_params(), family=st.sampled_from(FAMILIES))
def test_every_stage_accepts_or_refuses_with_one_line(worker, workspace, case, family):
    data, key = case
    (workspace / "params.yaml").write_bytes(data)
    for argv in stages_for(key, family):
        reply = worker.call(argv)
        event(f"{argv[-2] if len(argv) > 2 else argv[-1]}: exit {reply['rc']}")
        command = f"python -m flows.cli {' '.join(argv)}"
        assert not reply["crash"], f"{command} raised out of main:\n{reply['crash']}\nparams:\n{data[:2000]!r}"
        assert reply["rc"] in (0, 2), f"{command}: exit {reply['rc']}\n{reply['stderr']}"
        errors = [line for line in reply["stderr"].splitlines() if line.startswith("error:")]
        if reply["rc"] == 2:
            assert len(errors) == 1, f"{command}: expected one error line, got:\n{reply['stderr']}"
            line = errors[0]
            assert len(line) <= 1100, f"{command}: an error line of {len(line)} characters"
            names_something = "params.yaml" in line or "/" in line or (key and key.split(".")[-1] in line)
            assert names_something, f"{command}: the error names no key, value or file: {line}"
        else:
            assert not errors, f"{command}: exit 0 with an error line: {errors}"
        assert "Traceback" not in reply["stderr"], reply["stderr"]
        assert reply["seconds"] < CALL_TIMEOUT
        assert reply["call_rss"] < CALL_RSS_CEILING, f"{command}: the call took {reply['call_rss'] / GiB:.2f} GiB"


def test_the_worker_reports_a_runaway_allocation_as_a_crash(worker, workspace):
    """The property above can fail: 2 GiB more than the worker holds hits its limit and comes back as a crash."""
    reply = worker.call(allocate=2 * GiB)
    assert reply["rc"] == -1 and "MemoryError" in reply["crash"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    accepted = worker.call(["--dry-run", "train", "vae"])  # and the worker carries on
    assert accepted["rc"] == 0 and not accepted["crash"], accepted
