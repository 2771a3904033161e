"""Tests for genai_models.metrics against references, known answers and invariances.

References used (written out here, not imported from the code under test):
- FID: the classic pytorch-fid formula with scipy.linalg.sqrtm;
- BLEU / Self-BLEU: nltk 3.10.4 sentence_bleu with SmoothingFunction().method1,
  averaged over hypotheses (the Texygen convention);
- discretized logistic: mpmath at 50 digits.
"""

from __future__ import annotations

import ast
import sys
import math
import random
from pathlib import Path

import mpmath  # a torch dependency (via sympy); used as a high-precision reference
import numpy as np
import pytest
import scipy.linalg
import torch
from nltk.translate.bleu_score import SmoothingFunction, modified_precision, sentence_bleu

from genai_models.metrics import (
    bleu,
    discretized_logistic_log_prob,
    features_to_stats,
    fid_from_features,
    frechet_distance,
    log_mean_exp,
    nats_to_bits_per_dim,
    perplexity,
    self_bleu,
)

METRICS_DIR = Path(__file__).resolve().parents[1] / "genai_models" / "metrics"


def test_metrics_import_only_numpy_torch_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "torch", "genai_models"}
    for path in sorted(METRICS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


# ----------------------------------------------------------------------------- FID


def reference_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm of the product)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def two_feature_sets(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated, shifted Gaussian feature sets, (n, dim) each."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / math.sqrt(dim)
    b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / math.sqrt(dim) + 0.3
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [500, 40])  # 40 < D = 64: both covariances are singular
def test_frechet_distance_matches_scipy_sqrtm_reference(seed, n):
    a, b = two_feature_sets(seed, n, dim=64)
    stats_a, stats_b = features_to_stats(a), features_to_stats(b)
    expected = reference_frechet_distance(*stats_a, *stats_b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(expected, rel=1e-4)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-4)


def test_features_to_stats_matches_numpy_and_ignores_row_order():
    a, _ = two_feature_sets(3, 200, 16)
    mu, sigma = features_to_stats(a.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, a.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False, ddof=1), rtol=1e-5, atol=1e-7)
    mu_perm, sigma_perm = features_to_stats(a[np.random.default_rng(0).permutation(200)])
    mu_ref, sigma_ref = features_to_stats(a)
    np.testing.assert_allclose(mu_perm, mu_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma_perm, sigma_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_equal_covariances_give_squared_mean_distance(rank_deficient):
    rng = np.random.default_rng(4)
    factor = rng.normal(size=(32, 16 if rank_deficient else 64))
    sigma = factor @ factor.T / factor.shape[1]  # (32, 32), PSD
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric_and_zero_for_identical_sets():
    a, b = two_feature_sets(5, 300, 32)
    stats_a, stats_b = features_to_stats(a), features_to_stats(b)
    forward = frechet_distance(*stats_a, *stats_b)
    assert forward > 1.0  # the sets differ, so symmetry below is not 0 == 0
    assert frechet_distance(*stats_b, *stats_a) == pytest.approx(forward, rel=1e-9)
    scale = float(np.trace(stats_a[1]))
    assert abs(fid_from_features(a, a)) < 1e-6 * scale


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((1, 4)), np.zeros((2, 3, 4))])
def test_features_to_stats_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match=str(bad.shape).replace("(", r"\(").replace(")", r"\)")):
        features_to_stats(bad)


def test_frechet_distance_rejects_mismatched_shapes():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))


# ---------------------------------------------------------------------------- BLEU


def nltk_bleu(hypotheses, references, max_n=4):
    """Texygen BLEU: nltk sentence_bleu (method1) of each hypothesis vs all references."""
    smoothing = SmoothingFunction().method1
    return {
        n: float(np.mean([
            sentence_bleu(references, hyp, weights=(1 / n,) * n, smoothing_function=smoothing)
            for hyp in hypotheses
        ]))
        for n in range(2, max_n + 1)
    }


def nltk_self_bleu(sentences, max_n=4):
    """Brute-force leave-one-out Self-BLEU with nltk."""
    per_sentence = [nltk_bleu([s], sentences[:i] + sentences[i + 1:], max_n)
                    for i, s in enumerate(sentences)]
    return {n: float(np.mean([scores[n] for scores in per_sentence]))
            for n in range(2, max_n + 1)}


def random_sentences(seed, count, vocab_size, min_len, max_len):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    return [[rng.choice(vocab) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(count)]


def assert_scores_equal(actual, expected, tol=1e-9):
    assert actual.keys() == expected.keys()
    for n in expected:
        assert actual[n] == pytest.approx(expected[n], rel=tol, abs=tol), n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vocab_size", [3, 8])
def test_bleu_matches_nltk_on_random_sentences(seed, vocab_size):
    hyps = random_sentences(seed, 40, vocab_size, 0, 14)
    refs = random_sentences(seed + 100, 25, vocab_size, 1, 14)
    expected = nltk_bleu(hyps, refs)
    assert 0.0 < expected[4] < expected[2] < 1.0  # a fixture with partial overlap
    assert_scores_equal(bleu(hyps, refs), expected)


@pytest.mark.parametrize("max_n", [2, 3, 5])
def test_bleu_max_n_matches_nltk(max_n):
    hyps = random_sentences(7, 20, 5, 1, 10)
    refs = random_sentences(8, 15, 5, 1, 10)
    assert_scores_equal(bleu(hyps, refs, max_n=max_n), nltk_bleu(hyps, refs, max_n))


REFS = [
    "the cat sat on the mat".split(),
    "there is a cat on the mat today".split(),
    "a dog".split(),
]


@pytest.mark.parametrize("hyp", [
    "the cat on a mat sat".split(),        # no 3- or 4-gram overlap: method1 smoothing
    "the the the the the the the".split(),  # clipping by the max reference count
    [],                                     # empty hypothesis: score 0
    ["cat"], ["the", "cat"], ["on", "the", "mat"],  # shorter than 4 tokens
    ["zebra", "zebra", "zebra"],            # no unigram match: score 0
    "a cat sat on the mat today".split(),   # lengths 6 and 8 equidistant from 7: take 6
])
def test_bleu_matches_nltk_on_corner_cases(hyp):
    assert_scores_equal(bleu([hyp], REFS), nltk_bleu([hyp], REFS))


def test_bleu_corner_cases_have_known_values():
    no_4gram = "the cat on a mat sat".split()
    assert float(modified_precision(REFS, no_4gram, 2)) > 0.0
    assert float(modified_precision(REFS, no_4gram, 4)) == 0.0
    assert bleu([no_4gram], REFS)[4] > 0.0  # smoothed, not zeroed
    assert bleu([[]], REFS) == {2: 0.0, 3: 0.0, 4: 0.0}
    assert bleu([["zebra"]], REFS) == {2: 0.0, 3: 0.0, 4: 0.0}
    assert bleu([list(REFS[1])], REFS) == {2: 1.0, 3: 1.0, 4: 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_bleu_matches_brute_force_leave_one_out(seed):
    sentences = random_sentences(seed, 30, 4, 1, 12)
    sentences += [list(sentences[0]), list(sentences[1]), []]  # duplicates and an empty one
    expected = nltk_self_bleu(sentences)
    assert 0.0 < expected[4] < 1.0
    assert_scores_equal(self_bleu(sentences), expected)


def test_self_bleu_leave_one_out_known_values():
    # The only other copy of a duplicate is a reference: identical pair scores 1.
    pair = "a b c d e".split()
    assert self_bleu([pair, list(pair)]) == {2: 1.0, 3: 1.0, 4: 1.0}
    # A sentence is never its own reference: disjoint sentences score 0.
    assert self_bleu([["a", "b", "c"], ["d", "e", "f"], ["g", "h"]]) == {2: 0.0, 3: 0.0, 4: 0.0}
    # Second-largest count and unique-length removal: "a a a a" must be clipped by
    # the other sentences' max count of "a" (2), and its own length 4 is unique.
    sentences = [["a"] * 4, ["a", "a", "b"], ["a", "b", "b", "b", "b", "c"], ["b", "a"]]
    assert_scores_equal(self_bleu(sentences, max_n=3), nltk_self_bleu(sentences, max_n=3))


def test_bleu_rejects_bad_inputs():
    with pytest.raises(ValueError, match="references"):
        bleu([["a"]], [])
    with pytest.raises(ValueError, match="max_n"):
        bleu([["a"]], [["a"]], max_n=1)
    with pytest.raises(TypeError, match="list of tokens"):
        bleu(["a b c"], [["a"]])
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu([["a", "b"]])


# ---------------------------------------------------------------------- likelihood


def test_uniform_8bit_model_is_exactly_8_bits_per_dim():
    log_probs = torch.full((5, 3, 8, 8), -math.log(256.0))  # (B, C, H, W)
    nats_per_example = -log_probs.sum(dim=(1, 2, 3))  # (B,)
    assert nats_to_bits_per_dim(nats_per_example, 3 * 8 * 8) == pytest.approx(8.0, abs=1e-6)
    exact = np.full(5, 3 * 8 * 8 * math.log(256.0))
    assert nats_to_bits_per_dim(exact, 3 * 8 * 8) == pytest.approx(8.0, rel=1e-15)


def test_bits_per_dim_is_invariant_to_batch_size_and_input_type():
    nats = np.array([1500.0, 1720.5, 1333.25])
    single = nats_to_bits_per_dim(nats, 784)
    assert single == pytest.approx(nats.mean() / (784 * math.log(2)), rel=1e-15)
    assert nats_to_bits_per_dim(np.tile(nats, 7), 784) == pytest.approx(single, rel=1e-14)
    assert nats_to_bits_per_dim(torch.tensor(nats), 784) == pytest.approx(single, rel=1e-15)
    assert nats_to_bits_per_dim(float(nats.mean()), 784) == pytest.approx(single, rel=1e-15)
    with pytest.raises(ValueError, match="num_dims"):
        nats_to_bits_per_dim(nats, 0)


def test_log_mean_exp_matches_naive_and_is_stable():
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_mean_exp(x, 0), torch.log(torch.exp(x).mean(0)))
    torch.testing.assert_close(log_mean_exp(x, 1), torch.log(torch.exp(x).mean(1)))
    big = torch.tensor([[1000.0, 1000.0 + math.log(3.0)]])  # naive exp overflows
    result = log_mean_exp(big, 1)
    assert torch.isfinite(result).all()
    assert result.item() == pytest.approx(1000.0 + math.log(2.0), rel=1e-6)


def test_perplexity_known_value_and_errors():
    assert perplexity(120 * math.log(50.0), 120) == pytest.approx(50.0, rel=1e-12)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="num_tokens"):
        perplexity(10.0, 0)


EXTREME_PARAMS = [(127.5, 0.0), (0.0, 2.0), (255.0, -1.0), (-50.0, 1.0), (300.0, 1.5),
                  (100.3, -10.0), (40.0, 12.0), (128.0, 4.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean, log_scale", EXTREME_PARAMS)
def test_discretized_logistic_sums_to_one(mean, log_scale, dtype):
    x = torch.arange(256, dtype=dtype).reshape(256, 1, 1, 1)  # (B=256, C, H, W)
    log_p = discretized_logistic_log_prob(
        x, torch.tensor(mean, dtype=dtype), torch.tensor(log_scale, dtype=dtype))
    assert log_p.shape == x.shape and torch.isfinite(log_p).all()
    assert torch.logsumexp(log_p.double().flatten(), 0).exp().item() == pytest.approx(1.0, abs=1e-5)


def reference_log_prob(value: int, mean: float, log_scale: float) -> float:
    """log P(bin of value) with mpmath at 50 digits.

    Bins above the mean are computed as a difference of survival functions, bins
    below as a difference of CDFs, so the reference never subtracts two numbers
    close to 1 (mpmath's unbounded exponent keeps the tiny terms exact).
    """
    mpmath.mp.dps = 50
    scale = mpmath.exp(mpmath.mpf(log_scale))

    def sf(edge):  # P(X > edge)
        return 1 / (1 + mpmath.exp((mpmath.mpf(edge) - mpmath.mpf(mean)) / scale))

    def cdf(edge):  # P(X <= edge)
        return 1 / (1 + mpmath.exp(-(mpmath.mpf(edge) - mpmath.mpf(mean)) / scale))

    lower, upper = value - 0.5, value + 0.5
    if value == 255:
        return float(mpmath.log(sf(lower)))
    if value == 0:
        return float(mpmath.log(cdf(upper)))
    if value >= mean:
        return float(mpmath.log(sf(lower) - sf(upper)))
    return float(mpmath.log(cdf(upper) - cdf(lower)))


@pytest.mark.parametrize("mean, log_scale", EXTREME_PARAMS)
def test_discretized_logistic_matches_high_precision_reference(mean, log_scale):
    values = list(range(256))
    x = torch.tensor(values, dtype=torch.uint8).reshape(4, 1, 8, 8)  # uint8 input
    log_p64 = discretized_logistic_log_prob(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64))
    log_p32 = discretized_logistic_log_prob(x, torch.tensor(mean), torch.tensor(log_scale))
    expected = torch.tensor([reference_log_prob(v, mean, log_scale) for v in values],
                            dtype=torch.float64).reshape(4, 1, 8, 8)
    torch.testing.assert_close(log_p64, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_p32.double(), expected, rtol=1e-4, atol=1e-4)


def test_discretized_logistic_gradients_are_finite_and_shape_is_checked():
    x = torch.tensor([0.0, 3.0, 128.0, 254.0, 255.0]).reshape(1, 1, 1, 5)
    mean = torch.tensor([-40.0, 3.0, 300.0, 10.0, 128.0], requires_grad=True)
    log_scale = torch.tensor([-6.0, 0.0, 1.0, 5.0, -3.0], requires_grad=True)
    discretized_logistic_log_prob(x, mean, log_scale).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    with pytest.raises(ValueError, match="broadcast"):
        discretized_logistic_log_prob(x, torch.zeros(2, 1, 1, 1), torch.zeros(()))
