"""Report step: every family's metrics, samples and curves -> one self-contained HTML file.

The page opens with a verdict derived from the metrics and their intervals, then charts, then
tables generated from the metric catalogue (``genai_models.metrics.catalogue``), then each family's
samples and curves, the cost of each, and how the run can be reproduced. It needs no network:
images and charts are inlined as base64 PNG. It is rendered by Jinja2 with autoescaping on,
because generated sentences, corpus text and params are untrusted.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape

from genai_models.metrics.catalogue import CATALOGUE, Metric, MetricValue, metrics_for
from genai_models.registry import get_family
from tasks import charts, history, paths
from tasks.config import PipelineConfig
from tasks.io import OutputError, atomic_write_json, atomic_write_text
from tasks.runtime import StepClock, package_version
from tasks.samples import seed_model_dir

log = logging.getLogger(__name__)


@dataclass
class FamilyResult:
    """What the train and evaluate steps wrote for one family."""

    name: str
    modality: str
    metrics: dict[str, MetricValue]
    how: dict[str, str]
    train: dict                      # the headline model's summary.json
    evaluation: dict                 # provenance.json
    curve: list[dict[str, float]]    # loss.csv rows
    seed_train: list[dict] = field(default_factory=list)  # summary.json of every training seed's model
    configured: dict[str, MetricValue] | None = None      # sample metrics of the configured (non-plain) sampling
    samples_png: str | None = None
    configured_png: str | None = None
    sentences: list[str] = field(default_factory=list)
    configured_sentences: list[str] = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        """Training seconds over every training seed."""
        return sum(s.get("train_seconds") or 0.0 for s in self.seed_train or [self.train])


def read_metrics(path: Path) -> tuple[dict[str, MetricValue], dict[str, MetricValue] | None]:
    """metrics/<family>.json -> declared metrics, and the configured-sampling block if there is one."""
    raw = json.loads(path.read_text())
    configured = raw.pop("configured_sampling", None)
    metrics = {name: MetricValue.from_json(value) for name, value in raw.items()}
    return metrics, ({name: MetricValue.from_json(v) for name, v in configured.items()} if configured else None)


def read_curve(path: Path) -> list[dict[str, float]]:
    """loss.csv -> rows of {column: value} (empty cells left out)."""
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(handle)]


def _b64(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def load_result(config: PipelineConfig, family: str) -> FamilyResult:
    """Read what the train and evaluate steps wrote for ``family``."""
    model_dir, eval_dir = paths.model_dir(family), paths.evaluation_dir(family)
    provenance = json.loads((eval_dir / "provenance.json").read_text())
    metrics, configured = read_metrics(paths.metrics_file(family))
    seeds = config.training_seeds
    return FamilyResult(
        name=family, modality=get_family(family).modality, metrics=metrics, how=provenance.get("how", {}),
        train=json.loads((model_dir / "summary.json").read_text()), evaluation=provenance,
        curve=read_curve(model_dir / "loss.csv"),
        seed_train=[json.loads((seed_model_dir(family, s, seeds) / "summary.json").read_text()) for s in seeds],
        configured=configured, samples_png=_b64(eval_dir / "samples.png"),
        configured_png=_b64(eval_dir / "samples-configured.png"), sentences=_lines(eval_dir / "samples.txt"),
        configured_sentences=_lines(eval_dir / "samples-configured.txt"),
    )


# --- the verdict --------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _with_interval(value: MetricValue) -> str:
    interval = f" [{_fmt(value.low)}, {_fmt(value.high)}]" if value.low is not None else ""
    return f"{_fmt(value.value)}{interval}"


def ranking(results: list[FamilyResult], metric: Metric) -> tuple[list[FamilyResult], list[FamilyResult]]:
    """(families tied for best on ``metric``, the others in order); ties are intervals overlapping the best's."""
    scored = [r for r in results if metric.key in r.metrics]
    if not scored:
        return [], []
    order = sorted(scored, key=lambda r: _sort_key(metric, r.metrics[metric.key].value))
    best = order[0].metrics[metric.key]
    tied = [r for r in order if r is order[0] or r.metrics[metric.key].overlaps(best)]
    return tied, [r for r in order if r not in tied]


def _sort_key(metric: Metric, value: float) -> float:
    return {"lower": value, "higher": -value, "closer to 1": abs(value - 1.0)}[metric.better]


def verdict(results: list[FamilyResult], sample_count: int) -> list[str]:
    """The report's opening statements for one modality: best per question, ties stated as ties."""
    if not results:
        return []
    lines = []
    for metric in metrics_for(results[0].modality):
        if not metric.verdict:
            continue
        tied, rest = ranking(results, metric)
        if not tied:
            continue
        label = f"{metric.label}, {metric.better} is better"
        if metric.key in ("nll_bits_per_dim", "perplexity"):
            lines.append(_likelihood_statement(metric, tied + rest))
        elif len(tied) == 1:
            runner_up = f"; next: {rest[0].name} {_with_interval(rest[0].metrics[metric.key])}" if rest else ""
            lines.append(f"Best {metric.verdict}: {tied[0].name} ({label}: "
                         f"{_with_interval(tied[0].metrics[metric.key])}{runner_up}).")
        else:
            names = ", ".join(f"{r.name} {_with_interval(r.metrics[metric.key])}" for r in tied)
            lines.append(f"Best {metric.verdict}: a tie between {len(tied)} families ({label}): {names}. Their 95% "
                         f"intervals overlap, so at {sample_count} samples they are not distinguishable on this metric.")
    cheapest = sorted(results, key=lambda r: r.train_seconds)
    if len(cheapest) > 1:
        lines.append(f"Cheapest to train: {cheapest[0].name} ({cheapest[0].train_seconds:.0f} s); most expensive: "
                     f"{cheapest[-1].name} ({cheapest[-1].train_seconds:.0f} s) (training seconds on "
                     f"{cheapest[0].train.get('device', '?')}; not a metric: they depend on the machine).")
    return lines + warnings(results)


def _likelihood_statement(metric: Metric, order: list[FamilyResult]) -> str:
    def describe(r: FamilyResult) -> str:
        exact = metric.key == "perplexity" or "bits_per_dim" in r.metrics
        return f"{r.name} {'' if exact else '≤ '}{_fmt(r.metrics[metric.key].value)}{'' if exact else ' (bound)'}"

    text = f"Best likelihood ({metric.label}, lower is better): {describe(order[0])}"
    if len(order) > 1:
        text += "; then " + ", ".join(describe(r) for r in order[1:4])
    if any("bits_per_dim" not in r.metrics for r in order) and metric.key != "perplexity":
        text += ". A bound can only overstate the NLL: a family that reports one may be better than its number"
    return text + "."


def warnings(results: list[FamilyResult]) -> list[str]:
    """What a reader must not miss: no better than untrained, closer to the training set than real data."""
    out = []
    for r in results:
        untrained = [f"{CATALOGUE[key].label} {_fmt(value.value)} (untrained {_fmt(value.ceiling)})"
                     for key, value in r.metrics.items()
                     if value.ceiling is not None and CATALOGUE[key].better != "closer to 1"
                     and not CATALOGUE[key].is_better(value.value, value.ceiling)]
        if untrained:
            out.append(f"Warning: {r.name} is no better than the same architecture untrained on "
                       f"{', '.join(untrained)}.")
        memo = r.metrics.get("memorization")
        if memo is not None and memo.high is not None and memo.floor is not None and memo.high < memo.floor:
            out.append(f"Warning: {r.name}'s samples sit closer to their nearest training image than unseen real "
                       f"images do (memorisation {_with_interval(memo)}; real validation images "
                       f"{_fmt(memo.floor)}): look for copies of training images in its samples.")
    return out


# --- tables -------------------------------------------------------------------------------------
def table(results: list[FamilyResult], metrics: list[Metric], with_floor: bool,
          changes: dict[tuple[str, str], history.Change] | None = None) -> dict | None:
    """Rows of cells for the template: value, interval, seeds, change since the previous run; best (★)
    and ties (≈) per column."""
    columns = [m for m in metrics if any(m.key in r.metrics for r in results)]
    if not columns:
        return None
    marks: dict[tuple[str, str], str] = {}
    for metric in columns:
        tied, rest = ranking(results, metric)
        if len(tied) + len(rest) > 1:
            for r in tied:
                marks[(r.name, metric.key)] = "best" if len(tied) == 1 else "tie"
    rows = [{"name": r.name, "reference": False, "summary": r.train.get("model_summary", ""),
             "cells": [_cell(r.metrics.get(m.key), marks.get((r.name, m.key), ""), m,
                             (changes or {}).get((r.name, m.key))) for m in columns]}
            for r in results]
    if with_floor and any(m.floor for m in columns):
        floors = [next((r.metrics[m.key].floor for r in results if m.key in r.metrics), None) for m in columns]
        rows.append({"name": "real data (floor)", "reference": True,
                     "cells": [_cell(MetricValue(f) if f is not None else None, "", m)
                               for f, m in zip(floors, columns)]})
    return {"columns": columns, "rows": rows}


def _interval(low: float, high: float) -> str:
    """``[low, high]`` with 3 significant digits, more where 3 would print both ends alike (a narrow interval
    around a large value, e.g. an AIS NLL of 130.4 +- 0.07)."""
    digits = 3
    while f"{low:.{digits}g}" == f"{high:.{digits}g}" and digits < 7:
        digits += 1
    return f"[{low:.{digits}g}, {high:.{digits}g}]"


def _short(value: float) -> str:
    return f"{value:.3g}"


def _cell(value: MetricValue | None, mark: str, metric: Metric, change: history.Change | None = None) -> dict:
    """A table cell: the value (4 significant digits) and, smaller, its interval, spread, seed spread and
    change since the previous run."""
    if value is None:
        return {"value": "—", "interval": "", "std": "", "seeds": "", "mark": "", "change": None}
    return {"value": _fmt(value.value), "mark": mark, "change": change_cell(change) if change else None,
            "interval": _interval(value.low, value.high) if value.low is not None else "",
            "std": f"± {_short(value.std)} {metric.spread}" if value.std is not None else "",
            "seeds": (f"{value.seed_count} seeds: {_short(value.seed_mean)} ± {_short(value.seed_std)}"
                      if value.seed_count else "")}


def change_text(change: history.Change) -> str:
    """'+2300 (+252%)': the move since the previous run, signed, with its share of the previous value."""
    if change.direction == "new":
        return "new"
    if change.delta == 0:
        return "±0"
    return f"{change.delta:+.3g}{_share(change.relative)}"


def _share(relative: float | None) -> str:
    """' (+252%)', ' (+1.5%)', ' (-0.026%)': the relative change with about two significant digits."""
    if relative is None:
        return ""
    if abs(relative) >= 0.1:
        return f" ({relative:+.0%})"
    return f" ({relative:+.1%})" if abs(relative) >= 0.01 else f" ({relative * 100:+.2g}%)"


def change_cell(change: history.Change) -> dict:
    kind = "regression" if change.regression else change.direction
    title = {"regression": "regression", "worse": "worse, within what a re-draw would move it",
             "better": "better", "same": "unchanged", "new": "new"}[kind]
    return {"text": ("⚠ " if change.regression else "") + change_text(change), "kind": kind,
            "title": f"since the previous run: {title}" + (f" ({change.reason})" if change.reason else "")}


def ceiling_table(results: list[FamilyResult]) -> dict | None:
    """Untrained ceilings of every sample metric, per family (what no training at all scores)."""
    columns = [m for m in metrics_for("image", "samples") if any(
        r.metrics.get(m.key) and r.metrics[m.key].ceiling is not None for r in results)]
    if not columns:
        return None
    return {"columns": columns, "rows": [{"name": r.name, "cells": [
        _fmt(r.metrics[m.key].ceiling) if m.key in r.metrics else "—" for m in columns]} for r in results]}


def configured_rows(results: list[FamilyResult]) -> list[dict]:
    """Families whose default sampling is not plain: the same metrics measured that way."""
    return [{"name": r.name, "sampling": r.evaluation.get("sampling", ""),
             "plain": r.evaluation.get("plain_sampling", ""),
             "cells": {CATALOGUE[k].label: _with_interval(v) for k, v in r.configured.items()}}
            for r in results if r.configured]


# --- since the previous run ---------------------------------------------------------------------
@dataclass
class SincePrevious:
    """This run against the previous recorded run (``tasks.history``)."""

    previous: history.RunRecord | None
    changes: dict[tuple[str, str], history.Change]   # (family, metric key) -> change
    params: list[tuple[str, object, object]]          # params that differ: (key, before, now)
    data: list[tuple[str, str, str]]                  # data outputs that differ: (path, md5 before, now)
    trend: list[history.RunRecord]                    # earlier runs for the trend charts, oldest first
    params_sha256: str

    @property
    def regressions(self) -> list[history.Change]:
        return [c for c in self.changes.values() if c.regression]


def since_previous(config: PipelineConfig, results: list[FamilyResult]) -> SincePrevious:
    """Find the previous recorded run and compare every metric of this one with it."""
    current = {r.name: r.metrics for r in results}
    params = config.model_dump(mode="json")
    digest = history.params_digest(params)
    runs = [r for r in history.read_history(list(config.families), config.report.history_runs)
            if not history.same_state(r, current, digest)]
    previous = runs[0] if runs else None
    if previous is None:
        return SincePrevious(None, {}, [], [], [], digest)
    changes = history.compare_metrics(previous.metrics, current, config.report.regression_tolerance)
    data_now = {path: md5 for path, md5 in dvc_locked_hashes().items() if path.startswith("data/")}
    data = [(path, previous.data.get(path, "—"), md5) for path, md5 in data_now.items()
            if previous.data.get(path) not in (None, md5)]
    return SincePrevious(previous, {(c.family, c.metric.key): c for c in changes},
                         history.params_changes(previous.params, params), data,
                         runs[:config.report.history_runs - 1][::-1], digest)


def regression_lines(since: SincePrevious) -> list[str]:
    """One sentence per flagged regression (since ``since.previous``)."""
    return [f"{c.family} {c.metric.label}: {_with_interval(c.previous)} → {_with_interval(c.current)} "
            f"({change_text(c)}; {c.metric.better} is better; {c.reason})." for c in since.regressions]


def trend_charts(results: list[FamilyResult], since: SincePrevious) -> dict[str, str]:
    """Per family: its verdict metrics over the last ``report.history_runs`` runs, this run last."""
    labels = [datetime.fromtimestamp(r.time, timezone.utc).strftime("%m-%d %H:%M") for r in since.trend]
    out = {}
    for result in results:
        keys = [m.key for m in metrics_for(result.modality) if m.verdict and m.key in result.metrics]
        panels = {}
        for key in keys:
            points = [charts.Point(label, v.value, v.low, v.high) for label, run in zip(labels, since.trend)
                      if (v := run.metrics.get(result.name, {}).get(key)) is not None]
            value = result.metrics[key]
            points.append(charts.Point("this run", value.value, value.low, value.high))
            arrow = {"lower": "↓", "higher": "↑"}.get(CATALOGUE[key].better, "→1")
            panels[f"{CATALOGUE[key].label} {arrow}"] = points
        flagged = {CATALOGUE[c.metric.key].label for c in since.regressions if c.family == result.name}
        if panels:
            out[result.name] = base64.b64encode(charts.trend(
                f"{result.name}: the last {len(since.trend) + 1} run(s)", panels,
                {label for label in panels if label.rsplit(" ", 1)[0] in flagged})).decode()
    return out


def summary_record(config: PipelineConfig, results: list[FamilyResult], since: SincePrevious,
                   verdicts: dict[str, list[str]]) -> dict:
    """What the flow publishes as Prefect artifacts (reports/summary.json): verdict, regressions, every metric."""
    previous = since.previous
    rows = []
    for result in results:
        for key, value in result.metrics.items():
            change = since.changes.get((result.name, key))
            rows.append({
                "family": result.name, "metric": key, "label": CATALOGUE[key].label, "better": CATALOGUE[key].better,
                "value": value.value, "low": value.low, "high": value.high,
                "previous": change.previous.value if change and change.previous else None,
                "change": change_text(change) if change else "", "direction": change.direction if change else "",
                "regression": bool(change and change.regression)})
    return {
        "report": config.report.path, "params_sha256": since.params_sha256, "verdict": verdicts,
        "previous_run": None if previous is None else {
            "name": previous.name, "commit": previous.commit, "baseline": previous.baseline, "time": previous.when,
            "params_sha256": previous.params_sha256, "data": previous.data},
        "regressions": regression_lines(since), "params_changed": [[k, a, b] for k, a, b in since.params],
        "metrics": rows,
    }


# --- charts -------------------------------------------------------------------------------------
def _point(result: FamilyResult, key: str) -> charts.Point:
    value = result.metrics[key]
    return charts.Point(result.name, value.value, value.low, value.high)


def image_charts(results: list[FamilyResult], colors: dict[str, str]) -> dict[str, str]:
    """Base64 PNGs: precision-recall, FID with intervals, FID against training time."""
    out = {}
    with_pr = [r for r in results if "precision" in r.metrics and "recall" in r.metrics]
    if with_pr:
        floor = with_pr[0].metrics["precision"].floor, with_pr[0].metrics["recall"].floor
        out["precision_recall"] = charts.precision_recall(
            [(_point(r, "precision"), _point(r, "recall")) for r in with_pr], None if None in floor else floor, colors)
    with_fid = sorted((r for r in results if "fid" in r.metrics), key=lambda r: r.metrics["fid"].value)
    if with_fid:
        out["fid"] = charts.bars_with_intervals([_point(r, "fid") for r in with_fid], colors,
                                                title="FID (95% intervals)",
                                                label="FID (lower is better)", floor=with_fid[0].metrics["fid"].floor,
                                                log_scale=True)
    series = {r.name: [(row["train_seconds"], row["fid"]) for row in r.curve if "fid" in row and "train_seconds" in row]
              for r in results}
    if any(series.values()):
        out["fid_curve"] = charts.curves(series, colors, title="FID while training (curve samples)",
                                         xlabel="training seconds", ylabel="FID (log scale)", log_y=True)
    return {k: base64.b64encode(v).decode() for k, v in out.items()}


def text_charts(results: list[FamilyResult], colors: dict[str, str]) -> dict[str, str]:
    series = {r.name: [(row["train_seconds"], row["val_loss"]) for row in r.curve
                       if "val_loss" in row and "train_seconds" in row] for r in results}
    if not any(series.values()):
        return {}
    png = charts.curves(series, colors, title="Validation NLL while training", xlabel="training seconds",
                        ylabel="validation NLL (nats/token)")
    return {"val_curve": base64.b64encode(png).decode()}


_NOT_LOSSES = {"step", "samples_per_s", "train_seconds", "fid", "precision", "recall"}


def loss_chart(result: FamilyResult) -> str:
    columns = [c for c in dict.fromkeys(k for row in result.curve for k in row) if c not in _NOT_LOSSES]
    series = {c: [(row["step"], row[c]) for row in result.curve if c in row] for c in columns}
    return base64.b64encode(charts.loss_curves(series, f"{result.name}: training curves")).decode()


# --- metadata, cost, csv --------------------------------------------------------------------------
def run_metadata(config: PipelineConfig, results: list[FamilyResult]) -> dict:
    """Versions, data checksums and step timings that the reader needs to reproduce the run."""
    manifests = {m: json.loads((paths.data_dir(m) / "manifest.json").read_text())
                 for m in {r.modality for r in results}}
    feature_summary = _feature_summary() if any(r.modality == "image" for r in results) else {}
    timings = [feature_summary] if feature_summary else []
    for result in results:
        timings += [result.train, result.evaluation]
    packages = {name: package_version(name) for name in
                ("torch", "torchvision", "numpy", "matplotlib", "prefect", "dvc", "genai-pipeline")}
    return {
        "git_commit": _git_commit(), "dvc_hashes": dvc_locked_hashes(), "platform": platform.platform(),
        "python": platform.python_version(), "packages": packages,
        "devices": sorted({r.train.get("device", "?") for r in results}),
        "data": {m: {"dataset": man.get("dataset"), "sha256": _manifest_hash(m)} for m, man in manifests.items()},
        "params": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        "features": feature_summary,
        "timings": [{"step": t.get("step"), "wall_s": t.get("wall_s"), "peak_rss_mb": t.get("peak_rss_mb")}
                    for t in timings],
    }


def _feature_summary() -> dict:
    path = paths.FEATURE_EXTRACTOR / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def dvc_locked_hashes() -> dict[str, str]:
    """out path -> md5 recorded in dvc.lock (the versions this report was made from), if any."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {out["path"]: out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])
            if out["path"].startswith(("data/", "models/"))}


def _manifest_hash(modality: str) -> str:
    return hashlib.sha256((paths.data_dir(modality) / "manifest.json").read_bytes()).hexdigest()


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # dvc.lock and metrics/ are what a run writes: not changes to what it was made from.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock",
                                ":!metrics"], capture_output=True, text=True, check=True).stdout.splitlines()
        files = sorted({line[3:] for line in dirty if line.strip()})
        return commit + (f" (with uncommitted changes to {', '.join(files)})" if files else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


CSV_FIELDS = ("value", "low", "high", "std", "floor", "ceiling", "seed_mean", "seed_std", "seed_count")


def write_metrics_csv(results: list[FamilyResult], path: Path) -> None:
    """One row per (family, metric): the value and what stands beside it, direction, how it was made."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["family", "modality", "metric", "sampling", *CSV_FIELDS, "better", "how"])
    for result in results:
        blocks = [("plain", result.metrics, result.how)]
        if result.configured:
            blocks.append(("configured", result.configured, result.evaluation.get("configured_how") or {}))
        for sampling, metrics, how in blocks:
            for name, value in metrics.items():
                writer.writerow([result.name, result.modality, name, sampling,
                                 *("" if getattr(value, f) is None else getattr(value, f) for f in CSV_FIELDS),
                                 CATALOGUE[name].better, how.get(name, "")])
    atomic_write_text(path, buffer.getvalue())


def cost_rows(results: list[FamilyResult]) -> list[dict]:
    """Per family: what training cost (over every seed), its speed, generation speed, peak memory."""
    return [{
        "family": r.name, "device": r.train.get("device"), "seeds": len(r.seed_train) or 1,
        "steps": r.train.get("steps"), "train_seconds": r.train_seconds,
        "curve_seconds": sum(s.get("quality_curve_seconds") or 0.0 for s in r.seed_train or [r.train]),
        "train_samples_per_s": r.train.get("train_samples_per_s"),
        "generation_samples_per_s": r.evaluation.get("generation_samples_per_s"),
        "generation_how": r.evaluation.get("generation_how", ""),
        "train_peak_rss_mb": r.train.get("peak_rss_mb"), "evaluate_peak_rss_mb": r.evaluation.get("peak_rss_mb"),
        "evaluate_wall_s": r.evaluation.get("wall_s"),
    } for r in results]


# --- the page -----------------------------------------------------------------------------------
def verdict_lines(config: PipelineConfig, results: list[FamilyResult]) -> dict[str, list[str]]:
    """The verdict per modality."""
    return {"image": verdict([r for r in results if r.modality == "image"], config.evaluate.num_image_samples),
            "text": verdict([r for r in results if r.modality == "text"], config.evaluate.num_text_samples)}


def render(config: PipelineConfig, results: list[FamilyResult], wall_s: float, since: SincePrevious,
           verdicts: dict[str, list[str]]) -> str:
    environment = Environment(loader=PackageLoader("tasks", "templates"),
                              autoescape=select_autoescape(default=True, default_for_string=True))
    environment.filters["num"] = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else ("—" if v is None else v)
    image = [r for r in results if r.modality == "image"]
    text = [r for r in results if r.modality == "text"]
    intervals = next((r.evaluation.get("bootstrap_replicates") for r in results), 0)
    colors = charts.palette([r.name for r in results])
    changes = since.changes
    return environment.get_template("report.html.j2").render(
        title=config.report.title, results=results, meta=run_metadata(config, results), report_wall_s=wall_s,
        image_verdict=verdicts["image"], text_verdict=verdicts["text"],
        since=since, regressions=regression_lines(since), trend_charts=trend_charts(results, since),
        history_runs=config.report.history_runs, tolerance=config.report.regression_tolerance,
        image_table=table(image, metrics_for("image", "samples"), with_floor=True, changes=changes),
        likelihood_table=table([r for r in image if "nll_bits_per_dim" in r.metrics],
                               metrics_for("image", "likelihood"), with_floor=False, changes=changes),
        binarized_table=table([r for r in image if any(m.key in r.metrics for m in metrics_for("image", "binarized"))],
                              metrics_for("image", "binarized"), with_floor=False, changes=changes),
        text_table=table(text, metrics_for("text"), with_floor=True, changes=changes), ceilings=ceiling_table(image),
        configured=configured_rows(results), image_charts=image_charts(image, colors),
        text_charts=text_charts(text, colors),
        loss_charts={r.name: loss_chart(r) for r in results}, cost=cost_rows(results),
        catalogue=[m for m in CATALOGUE.values() if any(m.key in r.metrics for r in results)],
        seeds=config.training_seeds, sample_seed=config.sample_seed, bootstrap=intervals,
        num_image_samples=config.evaluate.num_image_samples, num_text_samples=config.evaluate.num_text_samples,
    )


def confined_report_path(path: str | Path, root: Path = Path(".")) -> Path:
    """``report.path`` as a path to write, refused (``OutputError``) unless it stays under ``root/reports``.

    params validation already keeps the value itself under reports/; this also catches a
    ``reports`` folder that is a link leading elsewhere, and a folder where the file goes.
    """
    reports = root.resolve() / "reports"  # the folder itself, not where a link named reports leads
    out = root / path
    where = out.parent.resolve()
    if where != reports and reports not in where.parents:
        raise OutputError(f"report.path {path} leads outside {root.resolve() / 'reports'} (to {where}); "
                          "the report is only written inside the repository's reports folder")
    for target in (out, out.with_name("metrics.csv")):
        if target.is_dir():
            raise OutputError(f"report.path: {target} is a folder, expected a file")
    return out


def build_report(config: PipelineConfig) -> Path:
    """Write the HTML report, ``reports/metrics.csv`` and ``reports/summary.json``; returns the HTML path."""
    clock = StepClock("report")
    out = confined_report_path(config.report.path)
    results = [load_result(config, name) for name in config.families]
    since = since_previous(config, results)
    if since.previous is None:
        log.info("no previous run recorded: nothing to compare with")
    else:
        log.info("compared with run %s: %d regression(s) flagged", since.previous.describe(), len(since.regressions))
    for line in regression_lines(since):
        log.warning("regression since run %s: %s", since.previous.name, line)
    lines = verdict_lines(config, results)
    write_metrics_csv(results, out.with_name("metrics.csv"))
    atomic_write_json(out.with_name("summary.json"), summary_record(config, results, since, lines))
    atomic_write_text(out, render(config, results, clock.record()["wall_s"], since, lines))
    log.info("report written to %s", out.resolve())
    return out
