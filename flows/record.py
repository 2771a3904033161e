"""What a finished run leaves behind beyond its outputs: a DVC experiment and three Prefect artifacts.

The run record. Each finished flow run is saved as a DVC experiment (``dvc exp save``): a git
commit under ``refs/exps/`` with the run's ``dvc.lock``, ``params.yaml`` and ``metrics/`` on top
of the commit it ran on (so: its metrics, git commit, data and model hashes, params and time). The
branch, the index and the working tree are left as they were. ``dvc exp show``, ``dvc metrics
diff run-A run-B``, DVC Studio and the report's "since the previous run" (``tasks/history.py``)
read these records; ``dvc exp push --no-cache origin`` shares them (``flows/deploy.py`` does, after
each scheduled run's ``dvc push``), and ``dvc exp pull --no-cache -A origin`` brings them into a fresh
clone (README "Run history" says why ``--no-cache``). A run that ran no
stage, on the commit and with the ``dvc.lock`` and params of the newest record, is that record
again and is not saved twice.

The artifacts, with stable keys so the Prefect UI's Artifacts page keeps each one's history:

- ``genai-pipeline-metrics`` (table): every metric of every family, its 95% interval, the previous
  run's value, the change and the regression flag;
- ``genai-pipeline-verdict`` (markdown): the regressions, the report's verdict, what changed;
- ``genai-pipeline-report`` (link): the HTML report.

They are made from ``reports/summary.json``, which the report stage writes beside the report.
"""

from __future__ import annotations

import json
import logging
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from flows.run_lock import dvc_lock
from tasks import history
from tasks.config import PipelineConfig

log = logging.getLogger(__name__)

METRICS_ARTIFACT = "genai-pipeline-metrics"
VERDICT_ARTIFACT = "genai-pipeline-verdict"
REPORT_ARTIFACT = "genai-pipeline-report"


class NotRecorded(RuntimeError):
    """The run could not be saved as a DVC experiment (the message says why and what to do)."""


def _git(root: Path, *args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def already_recorded(root: Path) -> str | None:
    """The newest record's name when it is this very state: same commit, same dvc.lock and params.yaml."""
    runs = history.recorded_runs(root)
    if not runs:
        return None
    commit, baseline, name, _ = runs[0]
    if baseline != _git(root, "rev-parse", "HEAD"):
        return None
    for path in ("dvc.lock", "params.yaml"):
        if not (root / path).exists() or _git(root, "rev-parse", f"{commit}:{path}") != _git(root, "hash-object", path):
            return None
    return name


def record_run(root: Path, ran: list[str], message: str, now: datetime | None = None) -> tuple[str, bool]:
    """Save the workspace as the DVC experiment ``run-<UTC time>``; returns (name, whether it is new).

    ``ran``: the stages this run ran (none: the newest record may already be this state).
    Raises ``NotRecorded`` with the reason when there is no git commit to record on or git refuses.
    """
    root = Path(root)
    if _git(root, "rev-parse", "--verify", "HEAD") is None:
        raise NotRecorded(f"{root} is not a git checkout with a commit: the run cannot be recorded as a DVC "
                          "experiment (git init && git add -A && git commit, then run again)")
    if not ran and (same := already_recorded(root)):
        return same, False
    name = f"run-{(now or datetime.now(timezone.utc)):%Y%m%d-%H%M%S}"
    # metrics/ may be untracked (a checkout that never committed them); dvc.lock may not exist until
    # `dvc exp save` commits the stages (DVC adds it itself only when it exists beforehand).
    untracked = [p for p in ("metrics",) if (root / p).exists()]
    untracked += [] if (root / "dvc.lock").exists() else ["dvc.lock"]
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with dvc_lock(root), Repo(str(root)) as repo:
            repo.experiments.save(name=name, include_untracked=untracked, message=message)
    except DvcException as err:
        raise NotRecorded(f"dvc exp save {name} failed: {err}") from err
    return name, True


def publish_artifacts(root: Path, config: PipelineConfig, run_name: str | None, ran: list[str],
                      note: str = "") -> dict:
    """Create the three artifacts in the current flow run from ``reports/summary.json``; returns that summary
    (empty, and nothing published, when there is none: a pipeline without the report stage)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    summary_path = root / Path(config.report.path).with_name("summary.json")
    if not summary_path.exists():
        log.warning("no %s: no artifacts published", summary_path)
        return {}
    summary = json.loads(summary_path.read_text())
    create_table_artifact(key=METRICS_ARTIFACT, table=metric_rows(summary),
                          description=f"Every metric of run {run_name or '(not recorded)'}, with its 95% interval "
                                      f"and its change since {_previous_name(summary)}")
    create_markdown_artifact(key=VERDICT_ARTIFACT, markdown=verdict_markdown(summary, run_name, ran, note),
                             description="The report's verdict and the regressions since the previous run")
    report = (root / config.report.path).resolve()
    create_link_artifact(key=REPORT_ARTIFACT, link=report.as_uri(),
                         link_text=f"report of {run_name or 'this run'} ({report.name})",
                         description=f"The HTML report in {root}. The report of this run, once a later one has "
                                     f"replaced it: `dvc get . {config.report.path} --rev {run_name or '<run>'} "
                                     f"-o old-report.html`")
    return summary


def _previous_name(summary: dict) -> str:
    previous = summary.get("previous_run")
    return f"run {previous['name']}" if previous else "no earlier recorded run"


def metric_rows(summary: dict) -> list[dict]:
    """The table artifact: one row per family and metric."""
    def number(value) -> str:
        return "" if value is None else f"{value:.4g}"

    return [{"family": row["family"], "metric": row["label"], "better": row["better"], "value": number(row["value"]),
             "95% interval": f"[{number(row['low'])}, {number(row['high'])}]" if row["low"] is not None else "",
             "previous": number(row["previous"]), "change": row["change"],
             "regression": "REGRESSION" if row["regression"] else ""} for row in summary.get("metrics", [])]


def verdict_markdown(summary: dict, run_name: str | None, ran: list[str], note: str = "") -> str:
    """The markdown artifact: regressions first, then the verdict, params changes, what ran and its record."""
    previous = summary.get("previous_run")
    lines = [f"# genai-pipeline: {run_name or 'run not recorded'}", ""]
    if previous is None:
        lines.append("No earlier run is recorded: nothing to compare with.")
    elif summary.get("regressions"):
        lines.append(f"**{len(summary['regressions'])} regression(s) since run {previous['name']}** "
                     f"({previous['time']}):")
        lines += [f"- {line}" for line in summary["regressions"]]
    else:
        lines.append(f"No regression since run {previous['name']} ({previous['time']}).")
    for modality, verdict in summary.get("verdict", {}).items():
        if verdict:
            lines += ["", f"## Verdict: {modality} families", *(f"- {line}" for line in verdict)]
    if summary.get("params_changed"):
        lines += ["", "## Params changed since the previous run",
                  *(f"- `{key}`: {old} → {new}" for key, old, new in summary["params_changed"])]
    stages = ", ".join(ran) if ran else ("none (everything was up to date; the results and the comparison above "
                                         "are those of the last run that changed them)")
    lines += ["", "## This run", f"- stages run: {stages}", f"- report: `{summary.get('report', '')}`"]
    lines.append(f"- run record: {note or run_name or 'none'}" + (" (`dvc exp show`)" if run_name else ""))
    return "\n".join(lines) + "\n"
