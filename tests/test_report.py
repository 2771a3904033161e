"""The HTML report: untrusted text is escaped, the best value is marked, nothing is fetched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tasks import paths
from tasks.config import parse_params
from tasks.io import atomic_write_json
from tasks.report import build_report, curve_svg
from tests.conftest import REPO_ROOT

HOSTILE = [
    "<script>alert('x')</script> the market fell",
    '<img src=x onerror="alert(1)"> prices rose',
    '<a href="javascript:alert(1)">click</a> today',
]


def _fake_family(name: str, modality: str, metrics: dict, sentences: list[str] | None = None) -> None:
    model_dir, eval_dir = paths.model_dir(name), paths.evaluation_dir(name)
    model_dir.mkdir(parents=True)
    eval_dir.mkdir(parents=True)
    (model_dir / "loss.csv").write_text("step,loss,samples_per_s\n1,3.5,10\n2,2.5,10\n")
    atomic_write_json(model_dir / "summary.json", {
        "step": f"train {name}", "wall_s": 1.0, "peak_rss_mb": 100.0, "device": "cpu", "precision": "fp32",
        "steps": 2, "train_seconds": 0.5, "train_samples_per_s": 64.0, "parameters": 1000})
    atomic_write_json(eval_dir / "provenance.json", {
        "family": name, "modality": modality, "how": {k: f"made <b>{k}</b>" for k in metrics},
        "step": f"evaluate {name}", "wall_s": 1.0, "peak_rss_mb": 100.0})
    if sentences is not None:
        (eval_dir / "samples.txt").write_text("\n".join(sentences) + "\n")
    atomic_write_json(paths.metrics_file(name), metrics)


@pytest.fixture
def report_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["families"] = {k: v for k, v in params["families"].items() if k in ("vae", "dcgan", "transformer_lm")}
    params["data"]["text"]["path"] = "<script>alert('path')</script>"
    for modality in ("images", "text"):
        (tmp_path / "data" / modality).mkdir(parents=True)
        atomic_write_json(tmp_path / "data" / modality / "manifest.json", {"dataset": "<i>fixture</i>"})
    atomic_write_json(paths.FEATURE_EXTRACTOR / "summary.json", {"step": "features", "wall_s": 2.0})
    _fake_family("vae", "image", {"fid": 30.0, "fid_real": 5.0, "fid_untrained": 300.0, "nll_iwae_nats": 700.0})
    _fake_family("dcgan", "image", {"fid": 20.0, "fid_real": 5.0, "fid_untrained": 280.0})
    _fake_family("transformer_lm", "text", {"bleu2": 0.5, "self_bleu2": 0.4, "perplexity": 90.0}, HOSTILE)
    return parse_params(params)


def test_untrusted_text_is_escaped(report_workspace):
    html = build_report(report_workspace).read_text()
    for needle in ("<script>alert", "<img src=x", 'href="javascript:', "<b>fid</b>", "<i>fixture</i>"):
        assert needle not in html, needle
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; the market fell" in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_best_value_is_marked_per_column_and_yardsticks_are_not(report_workspace):
    html = build_report(report_workspace).read_text()
    best_cells = re.findall(r'<td class="best\s*">([^<]*)</td>', html)
    assert "20 ★" in best_cells          # dcgan's FID beats the VAE's 30
    assert "280 ★" not in html and "5 ★" not in html  # floor / ceiling columns are never "best"
    assert "lower is better" in html and "higher is better" in html


def test_report_is_self_contained_and_csv_has_every_metric(report_workspace):
    out = build_report(report_workspace)
    html = out.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    rows = (out.with_name("metrics.csv")).read_text().splitlines()
    assert rows[0] == "family,modality,metric,value,better,how"
    assert len(rows) == 1 + 4 + 3 + 3


def test_curve_svg_escapes_series_names():
    svg = curve_svg({"<script>": [(0.0, 1.0), (1.0, 0.5)]})
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "<polyline" in svg


def test_report_names_the_dvc_versions_it_was_made_from(report_workspace):
    lock = {"schema": "2.0", "stages": {"train@vae": {"cmd": "x", "outs": [
        {"path": "models/vae", "md5": "abc123.dir", "size": 1, "nfiles": 1}]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    assert "abc123.dir" in build_report(report_workspace).read_text()


def test_headline_likelihood_is_the_exact_nll_or_the_tightest_bound():
    from markupsafe import Markup

    from tasks.report import FamilyResult, add_headline_likelihood

    def result(metrics):
        return FamilyResult("f", "image", dict(metrics), {k: "how" for k in metrics}, {}, {}, Markup(""))

    bounds = result({"bits_per_dim_elbo": 1.7, "bits_per_dim_iwae": 1.6, "fid": 9.0})
    add_headline_likelihood(bounds)
    assert bounds.metrics["nll_bits_per_dim"] == 1.6 and bounds.how["nll_bits_per_dim"].startswith("IWAE bound")
    exact = result({"bits_per_dim": 1.3})
    add_headline_likelihood(exact)
    assert exact.metrics["nll_bits_per_dim"] == 1.3 and exact.how["nll_bits_per_dim"].startswith("exact")
    gan = result({"fid": 20.0})
    add_headline_likelihood(gan)
    assert "nll_bits_per_dim" not in gan.metrics


def test_ais_estimates_keep_columns_of_their_own_and_rows_name_the_model_size(report_workspace):
    """The RBM's binarized-image NLL never enters the 8-bit headline column, its error bar and log Z are
    never ranked, and a family's own description (e.g. the HMM's state count) is shown, escaped."""
    from tasks.report import IMAGE_METRICS, comparison_table, load_result

    params = report_workspace.model_dump()
    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["families"]
    params["families"] |= {name: shipped[name] for name in ("rbm", "hmm")}
    _fake_family("rbm", "image", {"fid": 10.0, "fid_real": 5.0, "fid_untrained": 300.0, "nll_ais_nats": 95.0,
                                  "bits_per_dim_ais": 0.17, "nll_ais_stderr_nats": 0.05, "ais_log_z": 400.0})
    _fake_family("hmm", "text", {"bleu2": 0.3, "self_bleu2": 0.3, "perplexity": 140.0})
    for name, summary in (("rbm", "200 hidden units"), ("hmm", "<i>128</i> hidden states")):
        path = paths.model_dir(name) / "summary.json"
        atomic_write_json(path, {**json.loads(path.read_text()), "model_summary": summary})
    vae_metrics = json.loads(paths.metrics_file("vae").read_text())
    atomic_write_json(paths.metrics_file("vae"), {**vae_metrics, "bits_per_dim_iwae": 1.2, "nll_ais_stderr_nats": 0.01})

    rbm, vae = load_result("rbm"), load_result("vae")
    assert "nll_bits_per_dim" not in rbm.metrics and "nll_nats" not in rbm.metrics
    table = comparison_table([vae, rbm], IMAGE_METRICS)
    assert "nll_ais_stderr_nats" not in table["best"] and "ais_log_z" not in table["best"]
    assert table["best"]["fid"] == "rbm"

    html = build_report(parse_params(params)).read_text()
    assert "200 hidden units" in html and "&lt;i&gt;128&lt;/i&gt; hidden states" in html
    assert "AIS NLL estimate, binarized images" in html
