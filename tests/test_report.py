"""The HTML report: a verdict from metrics and intervals, tables from the catalogue, escaped text,
self-contained charts, and a page that a real browser renders without errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from genai_models.metrics.catalogue import CATALOGUE
from tasks.report import build_report
from tests.browser import needs_chromium, render
from tests.fake_run import make_fake_run


@pytest.fixture
def report_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_fake_run()


def _section(html: str, ident: str) -> str:
    return html.split(f'<h2 id="{ident}">', 1)[1].split("<h2", 1)[0]


def test_untrusted_text_is_escaped(report_workspace):
    html = build_report(report_workspace).read_text()
    for needle in ("<script>alert", "<img src=x", 'href="javascript:', "<b>fid</b>", "<i>fixture</i>",
                   "<b>classifier</b>"):
        assert needle not in html, needle
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; the market fell" in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_the_verdict_names_a_clear_winner_and_states_ties_as_ties(report_workspace):
    verdict = _section(build_report(report_workspace).read_text(), "verdict")
    assert "Best sample quality: dcgan (FID, lower is better: 20 [18, 22]; next: vae 30 [28, 32])" in verdict
    assert "Best fidelity: a tie between 2 families (precision, higher is better)" in verdict
    assert "not distinguishable" in verdict
    assert "Best diversity: dcgan (coverage" in verdict
    assert "Best likelihood (NLL bits/dim" in verdict and "vae ≤ 1.29 (bound)" in verdict
    assert "Cheapest to train: vae" in verdict
    # dcgan's memorisation interval lies below the real floor: flagged; the vae's is not.
    assert "dcgan&#39;s samples sit closer to their nearest training image" in verdict
    assert "vae&#39;s samples sit closer" not in verdict
    assert "One training seed" in verdict


def test_best_is_starred_only_when_distinguishable_and_ties_are_marked(report_workspace):
    table = _section(build_report(report_workspace).read_text(), "image-samples")
    cells = re.findall(r'<td class="(best|tie|)">([^<]*)<', table)
    assert ("best", "20 ★") in cells                     # FID: intervals apart
    assert ("tie", "0.8 ≈") in cells and ("tie", "0.75 ≈") in cells  # precision: overlapping intervals
    assert "[18, 22]" in table                           # the interval under the value
    assert "real data (floor)" in table


def test_tables_and_labels_come_from_the_catalogue(report_workspace):
    html = build_report(report_workspace).read_text()
    for key in ("fid", "precision", "recall", "coverage", "memorization", "bleu2", "perplexity"):
        assert CATALOGUE[key].label in html, key
    text = _section(html, "text")
    assert "BLEU-2 ↑" in text and "Self-BLEU-2 ↓" in text


def test_report_is_self_contained_with_charts_and_csv_has_every_metric(report_workspace):
    out = build_report(report_workspace)
    html = out.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    charts = _section(html, "charts")
    assert charts.count('src="data:image/png;base64,') == 4  # precision-recall, FID, FID curve, validation NLL
    rows = out.with_name("metrics.csv").read_text().splitlines()
    assert rows[0] == "family,modality,metric,sampling,value,low,high,std,floor,ceiling,seed_mean,seed_std," \
                      "seed_count,better,how"
    assert len(rows) == 1 + 5 + 8 + 4
    assert "dcgan,image,fid,plain,20.0,18.0,22.0,,5.0,280.0,,,,lower," in out.with_name("metrics.csv").read_text()


def test_report_names_the_dvc_versions_it_was_made_from(report_workspace):
    lock = {"schema": "2.0", "stages": {"train@vae": {"cmd": "x", "outs": [
        {"path": "models/vae", "md5": "abc123.dir", "size": 1, "nfiles": 1}]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    assert "abc123.dir" in build_report(report_workspace).read_text()


def test_several_training_seeds_show_their_spread(report_workspace):
    import json

    from tasks import paths

    metrics = json.loads(paths.metrics_file("dcgan").read_text())
    metrics["fid"].update(seed_mean=24.0, seed_std=3.5, seed_count=3)
    paths.metrics_file("dcgan").write_text(json.dumps(metrics))
    table = _section(build_report(report_workspace).read_text(), "image-samples")
    assert "3 seeds: 24 ± 3.5" in table


@needs_chromium
def test_a_real_browser_renders_the_page_without_console_errors(report_workspace, tmp_path):
    console, pixels = render(build_report(report_workspace), tmp_path / "report.png")
    assert console == [], console       # the page runs no script: any console message is an error
    assert pixels.shape == (6000, 1280)
    assert (pixels < 128).mean() > 0.01  # text, tables and charts, not a blank page
    # Every table fits the 1280-px window: nothing at all is drawn in the page's right margin (a table
    # with min-width 1400px put 5.7% non-white pixels there when this test was written).
    assert pixels[:, 1250:].min() == 255


def test_binarized_likelihoods_have_a_table_of_their_own_and_rows_name_the_model_size(report_workspace):
    """The RBM's AIS NLL (of binarized images) never sits among the 8-bit NLLs nor in their verdict; it is
    shown with its standard error; a family's own description (the HMM's state count) is shown, escaped."""
    import json

    from tasks import paths
    from tasks.config import parse_params
    from tasks.io import atomic_write_json
    from tests.conftest import REPO_ROOT
    from tests.fake_run import _family

    params = report_workspace.model_dump(exclude_unset=True)  # defaults of folder-only keys are refused
    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["families"]
    params["families"] |= {name: shipped[name] for name in ("rbm", "hmm")}
    _family("rbm", "image", {"fid": {"value": 900.0, "low": 880.0, "high": 920.0, "floor": 5.0, "ceiling": 3000.0},
                             "nll_ais_nats": {"value": 0.5, "low": 0.3, "high": 0.7, "std": 0.1},
                             "bits_per_dim_ais": {"value": 0.0009, "std": 0.0002}})
    _family("hmm", "text", {"perplexity": {"value": 140.0}, "nll_per_token": {"value": 4.94}})
    for name, summary in (("rbm", "200 hidden units, PCD-5"), ("hmm", "<i>128</i> hidden states")):
        path = paths.model_dir(name) / "summary.json"
        atomic_write_json(path, {**json.loads(path.read_text()), "model_summary": summary})

    html = build_report(parse_params(params)).read_text()
    binarized = _section(html, "binarized-likelihood")
    assert "rbm" in binarized and "200 hidden units, PCD-5" in binarized and "± 0.1 s.e. over AIS runs" in binarized
    assert "[0.3, 0.7]" in binarized and "dcgan" not in binarized   # only families that report it
    assert "rbm" not in _section(html, "image-likelihood")
    best_likelihood = re.search(r"<li[^>]*>(Best likelihood \(NLL[^<]*)</li>", _section(html, "verdict")).group(1)
    assert "rbm" not in best_likelihood          # its 0.5 nats would "win" against 8-bit NLLs if it were there
    assert "&lt;i&gt;128&lt;/i&gt; hidden states" in _section(html, "text")


def test_a_narrow_interval_around_a_large_value_keeps_its_two_ends_apart():
    from tasks.report import _interval

    assert _interval(18.0, 22.0) == "[18, 22]"
    assert _interval(130.339, 130.485) == "[130.3, 130.5]"
