"""End to end on tiny data: the real Prefect flow, then real `dvc repro`, in a temporary git repo."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genai_models.metrics.catalogue import CATALOGUE
from genai_models.registry import REGISTRY
from tests.pipeline_repo import FAMILIES, clean_env, make_repo, run, tiny_pipeline_params


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """The whole pipeline (every family, the project's own dvc.yaml) on tiny params."""
    root = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", FAMILIES, tiny_pipeline_params())
    env = clean_env(root)
    env.pop("OMP_NUM_THREADS")  # stages use every core, as in a user's run
    return root, env


@pytest.fixture(scope="module")
def flow_run(repo) -> subprocess.CompletedProcess:
    root, env = repo
    return run([sys.executable, "-m", "flows.pipeline"], root, env, timeout=1800)


def test_prefect_flow_runs_every_stage_and_writes_the_report(repo, flow_run):
    root, _ = repo
    assert f"report: {root / 'reports' / 'report.html'}" in flow_run.stdout
    html = (root / "reports" / "report.html").read_text()
    for family in ("vae", "dcgan", "transformer_lm"):
        assert family in html
    assert "FID" in html and "BLEU-4" in html and "perplexity" in html and "IWAE" in html and "Verdict" in html
    metrics = {name: json.loads((root / "metrics" / f"{name}.json").read_text()) for name in FAMILIES}
    for name, values in metrics.items():  # every family emits declared metrics only, image ones with yardsticks
        assert set(values) - {"configured_sampling"} <= set(CATALOGUE), name
        if REGISTRY[name].modality == "image":
            for key in ("fid", "kid", "precision", "recall", "density", "coverage", "inception_score", "memorization"):
                value = values[key]
                assert {"value", "low", "high", "floor", "ceiling"} <= set(value), (name, key)
                assert value["low"] <= value["value"] <= value["high"], (name, key)
            assert values["fid"]["floor"] < values["fid"]["ceiling"]
    assert metrics["vae"]["bits_per_dim_iwae"]["value"] > 0
    assert metrics["vae"]["nll_iwae_nats"]["value"] <= metrics["vae"]["nll_elbo_nats"]["value"] + 1
    lm = metrics["transformer_lm"]
    assert 1 < lm["perplexity"]["value"] and 0 <= lm["bleu2"]["low"] <= lm["bleu2"]["value"] <= lm["bleu2"]["high"] <= 1
    assert "distinct2" in lm
    # Image families logged their sample quality while training, against training seconds.
    curve = (root / "models" / "vae" / "loss.csv").read_text().splitlines()
    assert {"train_seconds", "fid", "precision", "recall"} <= set(curve[0].split(","))
    assert "Completed" in flow_run.stdout + flow_run.stderr


def test_dvc_repro_after_the_flow_does_no_work(repo, flow_run):
    root, env = repo
    result = run(["dvc", "repro"], root, env)
    assert "Running stage" not in result.stdout, result.stdout
    assert "up to date" in run(["dvc", "status"], root, env).stdout


def test_a_second_flow_run_says_nothing_changed(repo, flow_run):
    root, env = repo
    result = run([sys.executable, "-m", "flows.pipeline"], root, env)
    assert "nothing changed" in result.stdout + result.stderr


def _locked_outs(root: Path) -> dict[str, str]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def _tree_hashes(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_the_report_names_the_dvc_versions_and_git_commit_it_was_made_from(repo, flow_run):
    root, env = repo
    html = (root / "reports" / "report.html").read_text()
    versioned = {path: md5 for path, md5 in _locked_outs(root).items() if path.startswith(("data/", "models/"))}
    assert {"data/images", "data/text", "models/vae", "models/feature_extractor"} <= set(versioned)
    for path, md5 in versioned.items():
        assert md5 in html, f"{path} ({md5}) is not in the report"
    commit = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert commit in html and "uncommitted" not in html


def test_push_then_pull_into_an_empty_workspace_gives_identical_outputs(repo, flow_run):
    """dvc push; delete every output and the local cache; dvc pull: byte-identical, and the
    pulled checkpoint re-evaluates to byte-identical metrics."""
    root, env = repo
    run(["dvc", "push"], root, env)
    outs = [out for out in _locked_outs(root) if not out.startswith("metrics/")]  # metrics: cache false, git's
    before = {out: _tree_hashes(root / out) for out in outs}
    metrics_before = (root / "metrics" / "vae.json").read_bytes()
    for out in outs:
        if (root / out).is_dir():
            shutil.rmtree(root / out)
        else:
            (root / out).unlink()
    shutil.rmtree(root / ".dvc" / "cache")

    run(["dvc", "pull"], root, env)
    assert {out: _tree_hashes(root / out) for out in outs} == before
    assert "up to date" in run(["dvc", "status"], root, env).stdout
    run([sys.executable, "-m", "flows.cli", "evaluate", "vae"], root, env)  # from the pulled checkpoint
    assert (root / "metrics" / "vae.json").read_bytes() == metrics_before
    # evaluation/vae/provenance.json records this run's wall time: put the versioned one back.
    run(["dvc", "checkout", "--force", "evaluate_image@vae"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env).stdout


def test_dvc_repro_reruns_only_what_a_param_change_touches(repo, flow_run):
    root, env = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["families"]["dcgan"]["train"]["steps"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro"], root, env)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@dcgan", "evaluate_image@dcgan", "report"}, result.stdout
    shown = run(["dvc", "metrics", "show", "--json"], root, env).stdout
    assert "fid" in shown and "perplexity" in shown
