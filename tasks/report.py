"""Report step: every family's metrics, samples and curves -> one self-contained HTML file.

The page needs no network: images are inlined as base64 PNG and curves as inline SVG.
It is rendered by Jinja2 with autoescaping on, because generated sentences and corpus
text are untrusted.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from genai_models.registry import get_family
from tasks import paths
from tasks.config import PipelineConfig
from tasks.io import atomic_write_text
from tasks.runtime import StepClock

log = logging.getLogger(__name__)

# name -> (label, which way is better); the order is the order of the table columns.
IMAGE_METRICS = {
    "fid": ("FID", "lower"),
    "fid_real": ("FID floor: real data", "lower"),
    "fid_untrained": ("FID ceiling: untrained", "lower"),
    "nll_bits_per_dim": ("NLL bits/dim: exact, or the tightest bound", "lower"),
    "nll_nats": ("NLL (nats/image)", "lower"),
    "bits_per_dim": ("bits/dim", "lower"),
    "nll_elbo_nats": ("-ELBO (nats/image)", "lower"),
    "bits_per_dim_elbo": ("-ELBO bits/dim", "lower"),
    "nll_iwae_nats": ("IWAE NLL bound (nats/image)", "lower"),
    "bits_per_dim_iwae": ("IWAE bits/dim", "lower"),
}
TEXT_METRICS = {
    **{f"bleu{n}": (f"BLEU-{n}", "higher") for n in (2, 3, 4)},
    **{f"self_bleu{n}": (f"Self-BLEU-{n}", "lower") for n in (2, 3, 4)},
    "nll_per_token": ("NLL (nats/token)", "lower"),
    "perplexity": ("Perplexity per token", "lower"),
    "perplexity_per_word": ("Perplexity per word", "lower"),
    **{f"bleu{n}_real": (f"BLEU-{n}, real text", "higher") for n in (2, 3, 4)},
    **{f"self_bleu{n}_real": (f"Self-BLEU-{n}, real text", "lower") for n in (2, 3, 4)},
}
# Columns that describe the data or the yardsticks rather than a family: never "best".
REFERENCE_COLUMNS = {"fid_real", "fid_untrained"} | {k for k in TEXT_METRICS if k.endswith("_real")}


@dataclass
class FamilyResult:
    name: str
    modality: str
    metrics: dict[str, float]
    how: dict[str, str]
    train: dict
    evaluation: dict
    curve_svg: Markup
    samples_png: str | None = None
    sentences: list[str] = field(default_factory=list)


def load_result(family: str) -> FamilyResult:
    """Read what the train and evaluate steps wrote for ``family``."""
    model_dir, eval_dir = paths.model_dir(family), paths.evaluation_dir(family)
    provenance = json.loads((eval_dir / "provenance.json").read_text())
    result = FamilyResult(
        name=family, modality=get_family(family).modality,
        metrics=json.loads(paths.metrics_file(family).read_text()), how=provenance["how"],
        train=json.loads((model_dir / "summary.json").read_text()), evaluation=provenance,
        curve_svg=curve_svg(read_curve(model_dir / "loss.csv")),
    )
    add_headline_likelihood(result)
    if (eval_dir / "samples.png").exists():
        result.samples_png = base64.b64encode((eval_dir / "samples.png").read_bytes()).decode()
    if (eval_dir / "samples.txt").exists():
        result.sentences = (eval_dir / "samples.txt").read_text().splitlines()
    return result


# An image family's likelihood columns, in the order of preference when they tie: exact first.
_BITS_PER_DIM = {"bits_per_dim": "exact", "bits_per_dim_iwae": "IWAE bound", "bits_per_dim_elbo": "-ELBO bound"}


def add_headline_likelihood(result: FamilyResult) -> None:
    """One bits/dim column that compares every likelihood family: its exact NLL, else its tightest bound.

    Every bound reported is an upper bound on the same quantity (-log P(x) of the same 8-bit
    test images), so the smallest is the best statement the family makes about its NLL.
    """
    present = [(result.metrics[name], name) for name in _BITS_PER_DIM if name in result.metrics]
    if not present:
        return
    value, name = min(present, key=lambda item: (item[0], list(_BITS_PER_DIM).index(item[1])))
    result.metrics["nll_bits_per_dim"] = value
    result.how["nll_bits_per_dim"] = f"{_BITS_PER_DIM[name]} (the '{name}' column): {result.how.get(name, '')}"


def read_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """loss.csv -> {column: [(step, value), ...]} for every loss column."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in (rows[0].keys() if rows else []) if c not in ("step", "samples_per_s")]
    return {c: [(float(r["step"]), float(r[c])) for r in rows if r.get(c) not in (None, "")] for c in columns}


def curve_svg(series: dict[str, list[tuple[float, float]]], width: int = 420, height: int = 220) -> Markup:
    """A small inline line chart; only numbers and escaped names go into the markup."""
    points = [p for values in series.values() for p in values]
    if not points:
        return Markup("<p>No curve recorded.</p>")
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0
    left, right, top, bottom = 56, 10, 10, 28
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#bbb"/>']
    for i, (name, values) in enumerate(series.items()):
        coords = " ".join(
            f"{left + (x - x_min) / x_span * (width - left - right):.1f},"
            f"{top + (1 - (y - y_min) / y_span) * (height - top - bottom):.1f}" for x, y in values)
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{left + 6}" y="{top + 14 + 13 * i}" font-size="11" fill="{color}">{escape(name)}</text>')
    parts += [f'<text x="2" y="{top + 10}" font-size="10">{y_max:.4g}</text>',
              f'<text x="2" y="{height - bottom}" font-size="10">{y_min:.4g}</text>',
              f'<text x="{left}" y="{height - 8}" font-size="10">step {x_min:.0f}</text>',
              f'<text x="{width - right - 60}" y="{height - 8}" font-size="10">step {x_max:.0f}</text>', "</svg>"]
    return Markup("".join(parts))


def comparison_table(results: list[FamilyResult], catalogue: dict[str, tuple[str, str]]) -> dict:
    """Columns present in any result, each with its label, direction and best family."""
    columns = [name for name in catalogue if any(name in r.metrics for r in results)]
    best = {}
    for name in columns:
        if name in REFERENCE_COLUMNS:
            continue
        scored = [(r.metrics[name], r.name) for r in results if name in r.metrics]
        if len(scored) > 1:
            pick = min if catalogue[name][1] == "lower" else max
            best[name] = pick(scored)[1]
    return {"columns": [(name, *catalogue[name]) for name in columns], "best": best, "rows": results}


def run_metadata(config: PipelineConfig, results: list[FamilyResult]) -> dict:
    """Versions, data checksums and step timings that the reader needs to reproduce the run."""
    manifests = {m: json.loads((paths.data_dir(m) / "manifest.json").read_text())
                 for m in {r.modality for r in results}}
    timings = [json.loads((paths.FEATURE_EXTRACTOR / "summary.json").read_text())] if any(
        r.modality == "image" for r in results) else []
    for result in results:
        timings += [result.train, result.evaluation]
    packages = {name: _version(name) for name in ("torch", "torchvision", "numpy", "prefect", "dvc", "genai-pipeline")}
    return {
        "git_commit": _git_commit(), "dvc_hashes": dvc_locked_hashes(), "platform": platform.platform(),
        "python": platform.python_version(), "packages": packages,
        "devices": sorted({r.train.get("device", "?") for r in results}),
        "data": {m: {"dataset": man.get("dataset"), "sha256": _manifest_hash(m)} for m, man in manifests.items()},
        "params": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        "timings": [{"step": t.get("step"), "wall_s": t.get("wall_s"), "peak_rss_mb": t.get("peak_rss_mb")}
                    for t in timings],
    }


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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_metrics_csv(results: list[FamilyResult], path: Path) -> None:
    """One row per (family, metric): value, direction and how it was made."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["family", "modality", "metric", "value", "better", "how"])
    for result in results:
        catalogue = IMAGE_METRICS if result.modality == "image" else TEXT_METRICS
        for name, value in result.metrics.items():
            writer.writerow([result.name, result.modality, name, value, catalogue.get(name, ("", ""))[1],
                             result.how.get(name, "")])
    atomic_write_text(path, buffer.getvalue())


def cost_rows(results: list[FamilyResult]) -> list[dict]:
    """Per family: training time and speed, generation speed, peak memory of its train and evaluate steps.

    Read from models/<family>/summary.json and evaluation/<family>/provenance.json; a value a step
    did not record (an older evaluation) is None and shows as a dash.
    """
    return [{
        "family": r.name, "device": r.train.get("device"),
        "train_seconds": r.train.get("train_seconds"), "train_samples_per_s": r.train.get("train_samples_per_s"),
        "generation_samples_per_s": r.evaluation.get("generation_samples_per_s"),
        "generation_how": r.evaluation.get("generation_how", ""),
        "train_peak_rss_mb": r.train.get("peak_rss_mb"), "evaluate_peak_rss_mb": r.evaluation.get("peak_rss_mb"),
    } for r in results]


def render(config: PipelineConfig, results: list[FamilyResult], wall_s: float) -> str:
    environment = Environment(loader=PackageLoader("tasks", "templates"),
                              autoescape=select_autoescape(default=True, default_for_string=True))
    environment.filters["num"] = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else v
    image = [r for r in results if r.modality == "image"]
    text = [r for r in results if r.modality == "text"]
    return environment.get_template("report.html.j2").render(
        title=config.report.title, image_table=comparison_table(image, IMAGE_METRICS) if image else None,
        text_table=comparison_table(text, TEXT_METRICS) if text else None, results=results,
        meta=run_metadata(config, results), report_wall_s=wall_s, reference_columns_set=REFERENCE_COLUMNS,
        cost=cost_rows(results),
    )


def build_report(config: PipelineConfig) -> Path:
    """Write the HTML report and ``reports/metrics.csv``; returns the HTML path."""
    clock = StepClock("report")
    results = [load_result(name) for name in config.families]
    out = Path(config.report.path)
    write_metrics_csv(results, out.with_name("metrics.csv"))
    atomic_write_text(out, render(config, results, clock.record()["wall_s"]))
    log.info("report written to %s", out.resolve())
    return out
