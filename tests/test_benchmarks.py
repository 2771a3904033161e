"""The benchmark suite at toy size, so it cannot rot silently (the real run: python -m benchmarks.run)."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.common import Figure, interleaved, write_results
from benchmarks.metrics import bleu_figures, correlated_features, fid_figures, scipy_fid
from genai_models.metrics import fid_from_features


def test_fid_equals_the_scipy_sqrtm_formula():
    a, b = correlated_features(400, 16, seed=0)
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6)
    figures = {f.name: f for f in fid_figures(quick=True, n=300, dims=(16,), repeats=2)}
    assert figures["D=16: relative difference"].status == "pass"
    assert figures["D=16: scipy / ours time"].repeats == 2 and figures["D=16: scipy / ours time"].median > 0


def test_bleu_benchmark_matches_nltk_on_ten_sentences():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)]
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(3, 9))] for _ in range(30)]
    hyps, refs = sentences[:10], sentences[10:]
    figures = {f.name: f for f in bleu_figures(quick=True, hyps=hyps, refs=refs, per_repeat=5, repeats=2,
                                               self_check=10)}
    assert figures["max abs(ours - nltk)"].median <= 1e-9
    assert figures["max abs(self_bleu - nltk), small set"].median <= 1e-9
    assert figures["speed-up nltk / ours"].repeats == 2


def test_results_are_written_as_json_and_markdown(tmp_path):
    times_a, times_b = interleaved(lambda: None, lambda: None, 3)
    assert len(times_a) == len(times_b) == 3
    figures = [Figure.from_values("x", "ratio", "x", [1.0, 2.0, 3.0], "made up", target=lambda v: v >= 2,
                                  target_text=">= 2"),
               Figure("y", "skipped one", "s", None, status="skipped", how="no plain loop")]
    json_path, md_path = write_results(figures, {"command": "test", "machine": {"cpu": "toy"}}, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["figures"][0] | {"how": None} == {
        "item": "x", "name": "ratio", "unit": "x", "median": 2.0, "min": 1.0, "max": 3.0, "repeats": 3,
        "target": ">= 2", "status": "pass", "how": None}
    table = md_path.read_text()
    assert "| x | ratio | 2 x | 1–3 | 3 | >= 2 | pass |" in table and "skipped" in table


def test_report_cost_section_shows_training_generation_and_memory(tmp_path, monkeypatch):
    from tasks import paths
    from tasks.report import build_report
    from tests.fake_run import make_fake_run

    monkeypatch.chdir(tmp_path)
    report_workspace = make_fake_run()

    provenance = paths.evaluation_dir("vae") / "provenance.json"
    provenance.write_text(json.dumps({**json.loads(provenance.read_text()), "generation_samples_per_s": 1234.5,
                                      "generation_how": "model.sample(250)"}))
    html = build_report(report_workspace).read_text()
    cost = html.split('<h2 id="cost">Cost</h2>', 1)[1].split("<h2", 1)[0]
    vae_row = next(row for row in cost.split("<tr>") if row.startswith("<td>vae</td>"))
    assert "1234" in vae_row and "64" in vae_row and "100" in vae_row   # generation, training samples/s, RSS
    dcgan_row = next(row for row in cost.split("<tr>") if row.startswith("<td>dcgan</td>"))
    assert "—" in dcgan_row  # no generation speed recorded: a dash, not an error


def test_flop_counter_agrees_with_torch_and_follows_a_gradient_penalty():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.training import FlopCounter

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    x = torch.randn(8, 16, requires_grad=True)
    with FlopCounter() as ours:
        net(x).sum().backward()
    with FlopCounterMode(display=False) as reference:
        net(x).sum().backward()
    assert ours.total == reference.get_total_flops() > 0
    with FlopCounter() as penalty:  # double backward, which FlopCounterMode refuses
        (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        grad.pow(2).sum().backward()
    assert penalty.total > ours.total
