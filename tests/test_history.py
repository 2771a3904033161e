"""Run history: regressions judged against intervals and the tolerance; runs recorded as real DVC
experiments that the report compares with, that a fresh clone gets back, and that DVC reads too."""

from __future__ import annotations

import json
import re

import pytest

from flows import console, record
from genai_models.metrics.catalogue import CATALOGUE, MetricValue
from tasks import history
from tasks.config import load_params
from tasks.report import build_report
from tests.browser import needs_chromium, render
from tests.fake_run import IMAGE_METRICS, make_fake_run
from tests.pipeline_repo import clean_env, make_results_repo, run

FID, PRECISION, MEMO, NLL = (CATALOGUE[k] for k in ("fid", "precision", "memorization", "nll_bits_per_dim"))


# --- judging one move --------------------------------------------------------------------------------
@pytest.mark.parametrize(("metric", "previous", "current", "direction", "regression"), [
    (FID, MetricValue(30, 28, 32), MetricValue(45, 42, 48), "worse", True),       # beyond the interval
    (FID, MetricValue(30, 28, 32), MetricValue(31.5, 29, 34), "worse", False),    # a re-draw could do that
    (FID, MetricValue(30, 28, 32), MetricValue(20, 18, 22), "better", False),
    (PRECISION, MetricValue(0.8, 0.7, 0.9), MetricValue(0.6, 0.5, 0.7), "worse", True),   # higher is better
    (PRECISION, MetricValue(0.8, 0.7, 0.9), MetricValue(0.95, 0.9, 1.0), "better", False),
    (MEMO, MetricValue(1.05, 0.95, 1.15), MetricValue(1.4, 1.3, 1.5), "worse", True),      # closer to 1
    (MEMO, MetricValue(1.2, 1.1, 1.3), MetricValue(0.8, 0.7, 0.9), "same", False),         # as far from 1
    (NLL, MetricValue(1.30), MetricValue(1.32), "worse", True),        # no interval: +1.5% > 1%
    (NLL, MetricValue(1.30), MetricValue(1.305), "worse", False),      # +0.4%
    (NLL, None, MetricValue(1.3), "new", False),
    (FID, MetricValue(30), MetricValue(33, 31, 35), "worse", True),    # only this run's interval: 30 is outside it
    (FID, MetricValue(30, 28, 32), MetricValue(30, 28, 32), "same", False),
])
def test_a_regression_is_a_move_the_wrong_way_beyond_the_interval_or_tolerance(metric, previous, current, direction,
                                                                              regression):
    change = history.compare("vae", metric, previous, current, tolerance=0.01)
    assert (change.direction, change.regression) == (direction, regression), change.reason


def test_a_degenerate_interval_does_not_flag_a_change_in_the_fourth_decimal():
    """An untrained model's Inception score: a real run moved it 1.00031 [1.00024, 1.00037] -> 1.00005."""
    change = history.compare("vae", CATALOGUE["inception_score"], MetricValue(1.00031, 1.00024, 1.00037),
                             MetricValue(1.00005, 1.00002, 1.00007), tolerance=0.01)
    assert change.direction == "worse" and not change.regression
    assert "outside it, but by less than report.regression_tolerance" in change.reason


def test_params_changes_are_flattened_keys():
    old = {"families": {"vae": {"train": {"steps": 60, "lr": 1}}}, "seed": 0}
    new = {"families": {"vae": {"train": {"steps": 2, "lr": 1}}, "gmm": {"x": 1}}, "seed": 0}
    assert history.params_changes(old, new) == [("families.vae.train.steps", 60, 2), ("families.gmm", None, {"x": 1})]


# --- recorded runs, in a real git + DVC repository ------------------------------------------------
@pytest.fixture
def results_repo(tmp_path, monkeypatch):
    root = make_results_repo(tmp_path / "repo")
    for key, value in clean_env(root).items():
        if key.startswith("GIT_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    return root


def _run_pipeline_in_process(root, image_metrics=None):
    """What the two stages do (fake results, then the real report step), without the flow."""
    make_fake_run(image_metrics)
    return build_report(load_params(root / "params.yaml"))


def _section(html: str, ident: str) -> str:
    return html.split(f'<h2 id="{ident}">', 1)[1].split("<h2", 1)[0]


def test_the_report_compares_with_the_previous_recorded_run_and_flags_the_regression(results_repo):
    root = results_repo
    first = _run_pipeline_in_process(root)
    assert "No earlier run is recorded" in _section(first.read_text(), "since")
    name_a, new = record.record_run(root, ["results", "report"], "first", now=_at(1))
    assert new and name_a == "run-20261201-030001"

    worse = json.loads(json.dumps(IMAGE_METRICS))
    worse["vae"]["fid"].update(value=45.0, low=42.0, high=48.0)       # beyond [28, 32]
    worse["vae"]["precision"].update(value=0.7, low=0.6, high=0.8)     # worse, but inside [0.65, 0.85]
    worse["dcgan"]["coverage"].update(value=0.6, low=0.55, high=0.65)  # better
    html = _run_pipeline_in_process(root, worse).read_text()

    since = _section(html, "since")
    assert f"Compared with run <code>{name_a}</code>" in since
    assert "1 regression flagged" in since and "trend of vae" in since and "trend of transformer_lm" in since
    verdict = _section(html, "verdict")
    assert f"Regressions since the previous run ({name_a}" in verdict
    assert ("vae FID: 30 [28, 32] → 45 [42, 48] (+15 (+50%); lower is better; the previous run&#39;s 95% re-draw "
            "interval is [28, 32]: outside it).") in verdict
    table = _section(html, "image-samples")
    assert '<span class="chg regression" title="since the previous run: regression' in table
    assert "⚠ +15 (+50%)" in table
    assert re.search(r'<span class="chg worse"[^>]*>-0.05 \(-6.7%\)</span>', table)   # vae precision
    assert re.search(r'<span class="chg better"[^>]*>\+0.1 \(\+20%\)</span>', table)   # dcgan coverage
    assert '<span class="chg same"' in _section(html, "text")   # every metric shows its change, unchanged ones too
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["previous_run"]["name"] == name_a and len(summary["regressions"]) == 1
    assert {row["metric"] for row in summary["metrics"] if row["regression"]} == {"fid"}

    name_b, new = record.record_run(root, ["results", "report"], "second", now=_at(2))
    assert new
    runs = history.read_history(["vae", "dcgan", "transformer_lm"], 10)
    assert [r.name for r in runs] == [name_b, name_a]
    assert runs[0].metrics["vae"]["fid"] == MetricValue(45.0, 42.0, 48.0, floor=5.0, ceiling=300.0)
    assert runs[0].baseline == run(["git", "rev-parse", "HEAD"], root, clean_env(root)).stdout.strip()
    assert set(runs[0].data) == {"data/images", "data/text"}  # the data outputs' md5 in the run's dvc.lock
    assert run(["git", "cat-file", "-e", f"{runs[1].commit}:dvc.lock"], root, clean_env(root)).returncode == 0

    # The report of the same results, rendered again after they were recorded, still compares with run A.
    again = _run_pipeline_in_process(root, worse).read_text()
    assert f"Compared with run <code>{name_a}</code>" in _section(again, "since")
    # A run that ran nothing on the same commit, dvc.lock and params is that record again.
    assert record.record_run(root, [], "nothing ran", now=_at(3)) == (name_b, False)
    # Recording leaves the checkout as it was: only the run's own files differ from the commit.
    status = run(["git", "status", "--porcelain"], root, clean_env(root)).stdout.splitlines()
    assert sorted(status) == ["?? dvc.lock", "?? metrics/"], status


@needs_chromium
def test_the_compared_report_renders_in_a_browser_within_the_window(results_repo, tmp_path):
    """The change lines under every value and the trend charts keep every table inside 1280 px."""
    _run_pipeline_in_process(results_repo)
    record.record_run(results_repo, ["results", "report"], "first", now=_at(1))
    worse = json.loads(json.dumps(IMAGE_METRICS))
    worse["vae"]["fid"].update(value=45.0, low=42.0, high=48.0)
    page = _run_pipeline_in_process(results_repo, worse)
    assert "⚠ +15 (+50%)" in page.read_text()
    console, pixels = render(page, tmp_path / "report.png", height=7000)
    assert console == [], console
    assert pixels[:, 1250:].min() == 255  # nothing drawn in the right margin: every table fits


def _at(second: int):
    from datetime import datetime, timezone

    return datetime(2026, 12, 1, 3, 0, second, tzinfo=timezone.utc)


def test_recorded_runs_survive_a_fresh_clone_and_dvc_reads_them(results_repo, tmp_path, monkeypatch, capsys):
    """dvc exp push to a git remote; a fresh clone gets the runs back with dvc exp pull; the report's
    history, dvc exp show and dvc metrics diff read them there."""
    root, env = results_repo, clean_env(results_repo)
    _run_pipeline_in_process(root)
    name_a, _ = record.record_run(root, ["results"], "first", now=_at(1))
    worse = json.loads(json.dumps(IMAGE_METRICS))
    worse["vae"]["fid"].update(value=45.0, low=42.0, high=48.0)
    _run_pipeline_in_process(root, worse)
    name_b, _ = record.record_run(root, ["results"], "second", now=_at(2))

    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    run(["git", "remote", "add", "origin", str(origin)], root, env)
    run(["git", "push", "-q", "origin", "HEAD"], root, env)
    run(["dvc", "exp", "push", "--no-cache", "origin", name_a, name_b], root, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert history.read_history(["vae"], 10, clone) == []  # a plain clone has no refs/exps yet
    run(["dvc", "exp", "pull", "--no-cache", "-A", "origin"], clone, env)
    runs = history.read_history(["vae", "dcgan", "transformer_lm"], 10, clone)
    assert [r.name for r in runs] == [name_b, name_a]
    assert runs[0].metrics["vae"]["fid"].value == 45.0 and runs[1].metrics["vae"]["fid"].value == 30.0

    shown = run(["dvc", "exp", "show", "--csv", "-A"], clone, env).stdout
    assert name_a in shown and name_b in shown
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", name_a, name_b], clone, env).stdout)
    assert diff["metrics/vae.json"]["fid.value"] == {"old": 30.0, "new": 45.0, "diff": 15.0}
    monkeypatch.chdir(clone)
    assert console.main(["history"]) == 0  # genai-pipeline history
    listed = capsys.readouterr().out
    assert listed.index(name_b) < listed.index(name_a) and "FID 45 (+15 REGRESSION)" in listed
