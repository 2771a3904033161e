"""Sample-based image metrics and their intervals against independent implementations.

References: the ``prdc`` package (Naeem et al.'s own code) for precision, recall, density and
coverage; torchmetrics for KID and the Inception score; direct numpy formulas written out here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from genai_models.metrics.bleu import distinct_n
from genai_models.metrics.fid import fid_from_features
from genai_models.metrics.intervals import bootstrap_intervals, mean_with_interval, redraw_interval
from genai_models.metrics.sample_quality import (
    RealReference, SampleMetrics, inception_score, kernel_inception_distance, memorization_ratio,
    mmd2_unbiased, nearest_distances, pairwise_distances, polynomial_kernel, precision_recall_density_coverage,
)


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, (n, d))


class _Identity(torch.nn.Module):
    """torchmetrics' metrics take a feature network; this one hands the features through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.5, 0.7), (1.5, 1.3)])
def test_precision_recall_density_coverage_equal_the_prdc_package(k, shift, scale):
    prdc = pytest.importorskip("prdc")
    real, fake = _features(300, 16, 1), _features(250, 16, 2, shift, scale)
    ours = precision_recall_density_coverage(real, fake, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = prdc.compute_prdc(real, fake, nearest_k=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-6), name


def test_manifold_metrics_on_known_cases():
    real = _features(200, 8, 3)
    same = precision_recall_density_coverage(real, real, 5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = precision_recall_density_coverage(real, real + 100.0, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # Every sample on one real point: fully precise, nothing else covered.
    collapsed = precision_recall_density_coverage(real, np.repeat(real[:1], 50, axis=0), 5)
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] < 0.05 and collapsed["recall"] < 0.05


def test_kid_equals_torchmetrics_and_the_direct_formula():
    real, fake = _features(60, 12, 4), _features(60, 12, 5, 0.4)
    ours, std = kernel_inception_distance(real, fake, subsets=1, subset_size=60, rng=np.random.default_rng(0))
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=_Identity(), subsets=1, subset_size=60)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    assert ours == pytest.approx(float(metric.compute()[0]), abs=1e-6)
    assert std == 0.0
    # Written out: mean of k over distinct pairs within each set, minus twice the cross mean.
    kernel = lambda a, b: (a @ b / a.size + 1) ** 3  # noqa: E731
    m = len(real)
    within = sum(kernel(real[i], real[j]) + kernel(fake[i], fake[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(kernel(real[i], fake[j]) for i in range(m) for j in range(m))
    assert ours == pytest.approx(within / (m * (m - 1)) - 2 * cross / m**2, abs=1e-9)


def test_kid_of_identical_distributions_is_near_zero_and_of_different_ones_positive():
    rng = np.random.default_rng(0)
    same, _ = kernel_inception_distance(_features(400, 8, 6), _features(400, 8, 7), 20, 200, rng)
    different, _ = kernel_inception_distance(_features(400, 8, 6), _features(400, 8, 7, 1.0), 20, 200, rng)
    assert abs(same) < 0.05 < different
    # A set against itself: the diagonal is left out within the sets but not across them.
    k_xx = polynomial_kernel(_features(30, 4, 8), _features(30, 4, 8))
    off_diagonal_mean = (k_xx.sum() - np.trace(k_xx)) / (30 * 29)
    assert mmd2_unbiased(k_xx, k_xx, k_xx) == pytest.approx(2 * off_diagonal_mean - 2 * k_xx.mean())


def test_inception_score_equals_torchmetrics_and_the_direct_formula():
    logits = torch.from_numpy(_features(200, 10, 9, scale=3.0))
    probs = torch.softmax(logits, dim=1).numpy()
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Identity(), splits=1)
    metric.update(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert inception_score(probs)[0] == pytest.approx(float(metric.compute()[0]), abs=1e-6)
    # Ten splits, written out: exp of the mean KL to each split's own marginal.
    direct = []
    for part in np.array_split(probs, 10):
        marginal = part.mean(0)
        direct.append(np.exp(np.mean([(p * np.log(p / marginal)).sum() for p in part])))
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(np.mean(direct), abs=1e-9) and std == pytest.approx(np.std(direct), abs=1e-9)


def test_inception_score_bounds():
    one_hot = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(one_hot)[0] == pytest.approx(10.0)            # sharp and balanced: the maximum
    assert inception_score(np.full((100, 10), 0.1))[0] == pytest.approx(1.0)  # no confidence: the minimum


def test_memorization_catches_a_model_that_copies_its_training_set():
    train, test = _features(500, 8, 10), _features(200, 8, 11)
    test_to_train = nearest_distances(test, train)
    copies = train[np.random.default_rng(0).integers(0, 500, 200)]
    fresh = _features(200, 8, 12)
    assert memorization_ratio(nearest_distances(copies, train), test_to_train) == 0.0
    assert memorization_ratio(nearest_distances(fresh, train), test_to_train) == pytest.approx(1.0, abs=0.15)
    assert nearest_distances(test, train) == pytest.approx(pairwise_distances(test, train).min(1))


def _sample_metrics(fake: np.ndarray, seed: int = 0) -> SampleMetrics:
    reference = RealReference(test=_features(300, 8, 20), train=_features(600, 8, 21), k=5)
    probs = torch.softmax(torch.from_numpy(fake[:, :4] * 2), dim=1).numpy()
    return SampleMetrics(reference, fake, probs, kid_subsets=10, kid_subset_size=100, seed=seed)


def test_sample_metrics_plain_estimate_equals_the_single_functions():
    fake = _features(250, 8, 22, 0.3)
    metrics = _sample_metrics(fake)
    values = metrics.compute()
    ref = metrics.ref
    assert values["fid"] == pytest.approx(fid_from_features(ref.test, fake), rel=1e-9)
    for name, value in precision_recall_density_coverage(ref.test, fake, 5).items():
        assert values[name] == pytest.approx(value, abs=1e-12)
    kid, kid_std = kernel_inception_distance(ref.test, fake, 10, 100, np.random.default_rng(0))
    assert (values["kid"], values["kid_std"]) == pytest.approx((kid, kid_std))
    # A replicate that takes every sample once is the plain estimate (KID: on all samples at once).
    everything = metrics.compute(np.arange(250))
    assert everything["fid"] == pytest.approx(values["fid"]) and everything["recall"] == values["recall"]
    assert everything["kid"] == pytest.approx(mmd2_unbiased(ref.kernel, polynomial_kernel(fake, fake),
                                                            polynomial_kernel(ref.test, fake)))


def test_redraw_intervals_contain_fresh_draws_of_a_known_distribution():
    """The interval's promise, on a case with a known answer: a fresh draw's estimate lands inside ~95%."""
    rng = np.random.default_rng(0)
    inside = 0
    for trial in range(200):
        draw, fresh = rng.exponential(1.0, 200), rng.exponential(1.0, 200)
        estimate, (low, high) = mean_with_interval(draw, replicates=200, seed=trial)
        inside += low <= fresh.mean() <= high
    assert 0.9 <= inside / 200 <= 0.99


def test_bootstrap_intervals_bracket_the_estimate_and_skip_companions():
    metrics = _sample_metrics(_features(200, 8, 23, 0.5))
    estimate, intervals = bootstrap_intervals(metrics.compute, metrics.size, replicates=30, seed=1)
    assert "kid_std" in estimate and "kid_std" not in intervals
    for name, (low, high) in intervals.items():
        assert low <= estimate[name] <= high, name
        assert high > low or name == "memorization", name
    assert redraw_interval(3.0, np.array([1.0])) == (3.0, 3.0)


def test_distinct_n():
    assert distinct_n([["a", "b", "a", "b"]], 1) == 0.5
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == 0.5
    assert distinct_n([["a"]], 2) == 0.0
