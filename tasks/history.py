"""Run history: the recorded pipeline runs, read from git, and how metrics moved since the previous one.

Every finished flow run is recorded as a DVC experiment (``flows/record.py``: ``dvc exp save``): a
git commit under ``refs/exps/<baseline>/<name>`` holding that run's ``dvc.lock``, ``params.yaml``
and ``metrics/`` on top of the commit the run was made on. ``dvc exp show``, ``dvc metrics diff``
and DVC Studio read the same commits; ``dvc exp push`` / ``dvc exp pull`` carry them to a clone.
``dvc repro``, ``dvc pull`` and ``dvc checkout`` never touch them (they are git refs, not outputs).

Only runs made on commits in the history of ``HEAD`` count: an experiment saved on another branch
is not this line's history.

A metric *regressed* when it moved the wrong way (the catalogue's ``better``) by more than a
re-draw of the samples would move it: the new value lies outside the previous value's 95% re-draw
interval, on the worse side. Metrics without an interval (likelihoods, perplexity, or every metric
when ``evaluate.bootstrap`` is 0) regress when they got worse by more than
``report.regression_tolerance`` (a fraction of the previous value); a move smaller than that
fraction is never a regression, interval or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml

from genai_models.metrics.catalogue import CATALOGUE, Metric, MetricValue
from tasks.config import ParamsError, parse_params

log = logging.getLogger(__name__)

_EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/(.+)$")
Direction = Literal["better", "worse", "same", "new"]


@dataclass
class RunRecord:
    """One recorded run: what it was made from and what it measured."""

    name: str                      # the DVC experiment's name, e.g. run-20261201-031502
    commit: str                    # the experiment commit
    baseline: str                  # the git commit the run was made on
    time: float                    # when it was recorded (epoch seconds)
    params_sha256: str             # params_digest of the run's params.yaml
    data: dict[str, str]           # data output path -> md5 in the run's dvc.lock
    metrics: dict[str, dict[str, MetricValue]]   # family -> metric key -> value (plain sampling)
    params: dict = field(default_factory=dict)   # the run's params, resolved (raw when they no longer validate)

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.time, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def describe(self) -> str:
        return f"{self.name} ({self.when}, commit {self.baseline[:10]})"


class _Git:
    """Read-only git plumbing in ``root``; every call returns None when git or the repository is missing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, stdin: bytes | None = None) -> bytes | None:
        try:
            result = subprocess.run(["git", *args], cwd=self.root, input=stdin, capture_output=True, check=False)
        except OSError:
            return None
        return result.stdout if result.returncode == 0 else None

    def blobs(self, names: list[str]) -> list[bytes | None]:
        """Contents of ``rev:path`` objects, None where missing (one ``git cat-file --batch``)."""
        if not names:
            return []
        out = self.run("cat-file", "--batch", stdin="".join(f"{n}\n" for n in names).encode())
        if out is None:
            return [None] * len(names)
        blobs, position = [], 0
        for _ in names:
            end = out.index(b"\n", position)
            header = out[position:end].split()
            position = end + 1
            if len(header) == 3 and header[1] == b"blob":
                size = int(header[2])
                blobs.append(out[position:position + size])
                position += size + 1
            else:  # "<name> missing", or not a blob
                blobs.append(None)
        return blobs


def recorded_runs(root: Path = Path(".")) -> list[tuple[str, str, str, float]]:
    """(experiment commit, baseline commit, name, time) of every run recorded on ``HEAD``'s history, newest first."""
    git = _Git(Path(root))
    refs = git.run("for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(committerdate:unix) %(refname)",
                   "refs/exps")
    ancestors = git.run("rev-list", "HEAD")
    if not refs or ancestors is None:
        return []
    lineage = set(ancestors.decode().split())
    runs = []
    for line in refs.decode().splitlines():
        commit, when, ref = line.split(" ", 2)
        match = _EXP_REF.match(ref)
        if match and match[1] + match[2] in lineage:
            runs.append((commit, match[1] + match[2], match[3], float(when)))
    return sorted(runs, key=lambda run: (run[3], run[2]), reverse=True)


def read_history(families: list[str], limit: int, root: Path = Path(".")) -> list[RunRecord]:
    """The ``limit`` most recent recorded runs (newest first) that measured any of ``families``."""
    git = _Git(Path(root))
    records = []
    for commit, baseline, name, when in recorded_runs(root):
        params_blob, lock_blob, *metric_blobs = git.blobs(
            [f"{commit}:params.yaml", f"{commit}:dvc.lock", *(f"{commit}:metrics/{f}.json" for f in families)])
        metrics = {}
        for family, blob in zip(families, metric_blobs):
            if blob is not None:
                parsed = _parse_metrics(blob)
                if parsed:
                    metrics[family] = parsed
        if not metrics:
            continue
        params = resolved_params(_safe_yaml(params_blob))
        records.append(RunRecord(name=name, commit=commit, baseline=baseline, time=when,
                                 params_sha256=params_digest(params), data=_data_hashes(lock_blob),
                                 metrics=metrics, params=params))
        if len(records) >= limit:
            break
    return records


def resolved_params(raw: dict) -> dict:
    """Params as the pipeline resolves them (defaults filled in), so runs compare by value, not by
    file layout; a file that no longer validates (an older schema) is kept as written."""
    try:
        return parse_params(raw).model_dump(mode="json")
    except ParamsError:
        return raw


def params_digest(params: dict) -> str:
    """sha256 of resolved params (key order and comments do not count)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def _parse_metrics(blob: bytes) -> dict[str, MetricValue]:
    """A recorded metrics/<family>.json -> declared metrics (plain sampling); unreadable parts are left out."""
    try:
        raw = json.loads(blob)
    except ValueError:
        return {}
    out = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        if key in CATALOGUE:
            try:
                out[key] = MetricValue.from_json(value)
            except (TypeError, ValueError):  # written by another version of the pipeline
                continue
    return out


def _safe_yaml(blob: bytes | None) -> dict:
    try:
        parsed = yaml.safe_load(blob) if blob else {}
    except yaml.YAMLError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _data_hashes(lock_blob: bytes | None) -> dict[str, str]:
    stages = _safe_yaml(lock_blob).get("stages") or {}
    return {out["path"]: out.get("md5", "") for stage in stages.values() if isinstance(stage, dict)
            for out in stage.get("outs", []) if str(out.get("path", "")).startswith("data/")}


# --- comparing two runs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """How one metric of one family moved since the previous run."""

    family: str
    metric: Metric
    previous: MetricValue | None
    current: MetricValue
    direction: Direction
    regression: bool
    reason: str            # how the move was judged (the interval or the tolerance it was held against)

    @property
    def delta(self) -> float | None:
        return None if self.previous is None else self.current.value - self.previous.value

    @property
    def relative(self) -> float | None:
        """The change as a fraction of the previous value (None when that is 0 or absent)."""
        if self.previous is None or self.previous.value == 0:
            return None
        return self.delta / abs(self.previous.value)


def compare(family: str, metric: Metric, previous: MetricValue | None, current: MetricValue,
            tolerance: float) -> Change:
    """Judge one metric's move: better, worse or the same, and whether it is a regression.

    With an interval (the previous run's; else this run's): a regression is a worse value outside
    the previous value's 95% re-draw interval (or a previous value outside this value's interval).
    Without one: worse by more than ``tolerance`` times the previous value. A move smaller than that
    is never a regression, whatever the interval: a degenerate interval (an untrained model's
    Inception score, [1.00024, 1.00037]) would otherwise flag a change in the fourth decimal.
    """
    def change(direction: Direction, regression: bool = False, reason: str = "") -> Change:
        return Change(family, metric, previous, current, direction, regression, reason)

    if previous is None:
        return change("new", reason="not measured in the previous run")
    if current.value == previous.value:
        return change("same")
    if metric.is_better(current.value, previous.value):
        return change("better")
    if not metric.is_better(previous.value, current.value):  # e.g. the same distance from 1
        return change("same")
    limit = tolerance * abs(previous.value) if previous.value != 0 else tolerance
    beyond = abs(current.value - previous.value) > limit
    small = "" if beyond else f", but by less than report.regression_tolerance {tolerance:g} ({limit:.4g})"
    if previous.low is not None and previous.high is not None:
        outside = not previous.low <= current.value <= previous.high
        return change("worse", outside and beyond,
                      f"the previous run's 95% re-draw interval is [{previous.low:.4g}, {previous.high:.4g}]: "
                      f"{'outside' if outside else 'inside'} it{small if outside else ''}")
    if current.low is not None and current.high is not None:
        outside = not current.low <= previous.value <= current.high
        return change("worse", outside and beyond,
                      f"this run's 95% re-draw interval [{current.low:.4g}, {current.high:.4g}] "
                      f"{'does not hold' if outside else 'holds'} the previous value{small if outside else ''}")
    return change("worse", beyond, f"no interval: held against report.regression_tolerance {tolerance:g} "
                                   f"({'more' if beyond else 'less'} than {limit:.4g})")


def compare_metrics(previous: dict[str, dict[str, MetricValue]], current: dict[str, dict[str, MetricValue]],
                    tolerance: float) -> list[Change]:
    """Every current metric of every family against the previous run, in catalogue order."""
    out = []
    for family, metrics in current.items():
        for key in sorted(metrics, key=list(CATALOGUE).index):
            out.append(compare(family, CATALOGUE[key], previous.get(family, {}).get(key), metrics[key], tolerance))
    return out


def same_state(record: RunRecord, metrics: dict[str, dict[str, MetricValue]], params_sha256: str) -> bool:
    """Whether ``record`` is a recording of these very results (same params, same metrics)."""
    return record.params_sha256 == params_sha256 and all(
        record.metrics.get(family) == values for family, values in metrics.items())


def previous_run(history: list[RunRecord], metrics: dict[str, dict[str, MetricValue]],
                 params_sha256: str) -> RunRecord | None:
    """The run to compare with: the newest recorded run that is not a recording of these same results
    (a report rendered again after its run was recorded compares with the run before, as it did then)."""
    return next((r for r in history if not same_state(r, metrics, params_sha256)), None)


def params_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Flattened (key, old, new) of every params value that differs; a missing side is None."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += params_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]
