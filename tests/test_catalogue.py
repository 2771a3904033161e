"""The metric catalogue: every key any family can emit is declared once, with a direction."""

from __future__ import annotations

import numpy as np
import pytest

from genai_models.metrics.catalogue import CATALOGUE, METRICS, MetricValue, get_metric
from genai_models.metrics.sample_quality import RealReference, SampleMetrics
from genai_models.registry import REGISTRY
from tasks.evaluate import headline_likelihood, metric_values, Measured, text_sample_metrics
from tests.conftest import tiny_model


def test_every_likelihood_key_any_family_can_emit_is_declared(family_name):
    model = tiny_model(family_name)
    if not model.has_likelihood or model.modality != "image":
        return
    suffixes = model.likelihood_bounds(iw_samples=7) if model.likelihood_is_bound else {"": (1, "exact")}
    for suffix in suffixes:
        assert f"nll{suffix}_nats" in CATALOGUE and f"bits_per_dim{suffix}" in CATALOGUE, (family_name, suffix)


def test_every_sample_and_text_metric_is_declared():
    rng = np.random.default_rng(0)
    reference = RealReference(test=rng.normal(size=(40, 4)), train=rng.normal(size=(60, 4)), k=3)
    probs = rng.dirichlet(np.ones(5), 30)
    image_keys = set(SampleMetrics(reference, rng.normal(size=(30, 4)), probs, 3, 10, 0).compute()) - {"kid_std"}
    sentences = [["a", "b", "c"], ["b", "c", "d"], ["a", "c"]]
    text_keys = set(text_sample_metrics(sentences, sentences, replicates=5, seed=0).values)
    assert image_keys | text_keys | {"nll_per_token", "perplexity", "nll_bits_per_dim"} <= set(CATALOGUE)


def test_undeclared_keys_are_refused_naming_the_key():
    with pytest.raises(KeyError, match="'sharpness' is not declared"):
        get_metric("sharpness")
    with pytest.raises(KeyError, match="'sharpness'"):
        metric_values(Measured(values={"sharpness": 1.0}), {}, {}, [])


def test_declarations_are_complete_and_consistent():
    for metric in METRICS:
        assert metric.label and metric.how and metric.better in ("lower", "higher", "closer to 1"), metric.key
        assert metric.modality in {family.modality for family in REGISTRY.values()}
        if metric.interval:
            assert metric.group in ("samples", "text")
    assert [m.key for m in METRICS] == list(CATALOGUE)          # one declaration per key, in order
    assert CATALOGUE["fid"].is_better(10.0, 20.0) and CATALOGUE["recall"].is_better(0.9, 0.1)
    assert CATALOGUE["memorization"].is_better(0.95, 0.5) and CATALOGUE["memorization"].is_better(1.1, 1.5)


def test_metric_values_clip_intervals_to_the_metric_range_and_add_seed_spread():
    measured = Measured(values={"coverage": 0.99, "fid": 5.0}, intervals={"coverage": (0.95, 1.03), "fid": (-1.0, 9.0)})
    values = metric_values(measured, {"coverage": 0.97, "fid": 2.0}, {"fid": 300.0},
                           [{"coverage": 0.99, "fid": 5.0}, {"coverage": 0.9, "fid": 7.0}])
    assert (values["coverage"].low, values["coverage"].high) == (0.95, 1.0)
    assert values["fid"].low == 0.0 and values["fid"].ceiling == 300.0 and values["fid"].floor == 2.0
    assert values["fid"].seed_count == 2 and values["fid"].seed_mean == 6.0
    assert values["fid"].seed_std == pytest.approx(np.std([5.0, 7.0], ddof=1))


def test_metric_value_round_trips_and_overlap():
    value = MetricValue(1.23456789, low=1.0, high=1.5, floor=0.5)
    assert MetricValue.from_json(value.to_json()) == MetricValue(1.23457, low=1.0, high=1.5, floor=0.5)
    assert value.overlaps(MetricValue(1.4, 1.45, 1.6)) and not value.overlaps(MetricValue(2.0, 1.8, 2.2))
    assert MetricValue.from_json(3.0) == MetricValue(3.0)
    with pytest.raises(ValueError, match="unknown metric fields"):
        MetricValue.from_json({"value": 1.0, "lo": 0.5})


def test_headline_likelihood_is_the_exact_nll_or_the_tightest_bound():
    assert headline_likelihood({"bits_per_dim_elbo": 1.7, "bits_per_dim_iwae": 1.6, "fid": 9.0}) == "bits_per_dim_iwae"
    assert headline_likelihood({"bits_per_dim": 1.3}) == "bits_per_dim"
    assert headline_likelihood({"bits_per_dim": 1.3, "bits_per_dim_elbo": 1.3}) == "bits_per_dim"  # a tie: exact
    with pytest.raises(ValueError):
        headline_likelihood({"fid": 20.0})
