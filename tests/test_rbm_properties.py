"""RBM: the free energy, the exact and the AIS partition function, and Gibbs sampling, on RBMs small
enough to enumerate (Salakhutdinov & Murray 2008 check AIS the same way on a 20-unit RBM)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from genai_models.base import ImageSpec
from genai_models.rbm import (
    RBM, RBMConfig, ais_betas, ais_log_partition, exact_log_partition, free_energy, gibbs_chain,
)


def _random_rbm(num_visible: int, num_hidden: int, seed: int, scale: float = 1.0):
    """Weights, visible and hidden biases in float64, far enough from zero to make the distribution lumpy."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(num_visible, num_hidden, generator=g, dtype=torch.float64),
            torch.randn(num_visible, generator=g, dtype=torch.float64),
            torch.randn(num_hidden, generator=g, dtype=torch.float64))


def _all_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)   # (2^n, n)


def _energy(v: torch.Tensor, h: torch.Tensor, weight, b, c) -> torch.Tensor:
    """E(v, h) = -b.v - c.h - v W h for every pair: v (N, D), h (M, H) -> (N, M)."""
    return -(v @ b)[:, None] - (h @ c)[None, :] - v @ weight @ h.T


def test_free_energy_equals_brute_force_sum_over_hidden_states():
    weight, b, c = _random_rbm(5, 4, seed=0)
    v, h = _all_states(5), _all_states(4)
    brute = -torch.logsumexp(-_energy(v, h, weight, b, c), dim=1)                       # (32,)
    assert torch.allclose(free_energy(v, weight, b, c), brute, atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_exact_log_partition_equals_the_sum_over_every_joint_state(shape):
    weight, b, c = _random_rbm(*shape, seed=1)
    brute = float(torch.logsumexp(-_energy(_all_states(shape[0]), _all_states(shape[1]), weight, b, c).flatten(), 0))
    assert exact_log_partition(weight, b, c) == pytest.approx(brute, abs=1e-9)


def test_ais_schedule_runs_from_zero_to_one_and_is_finest_near_one():
    betas = ais_betas(1450)
    assert betas[0] == 0 and betas[-1] == 1 and len(betas) == 1451
    steps = betas.diff()
    assert (steps > 0).all()
    assert steps[-1] < steps[0] / 5   # 0.1 / 1000 near beta = 1 vs 0.5 / 50 near 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ais_matches_the_exact_log_partition_within_three_standard_errors(seed):
    """A 12 x 8 RBM (20 units) with unit-scale weights: the estimate must be close and the error bar honest."""
    weight, b, c = _random_rbm(12, 8, seed=seed)
    exact = exact_log_partition(weight, b, c)
    estimate = ais_log_partition(weight, b, c, torch.zeros(12), num_runs=200, num_betas=2000,
                                 generator=torch.Generator().manual_seed(seed))
    assert 0 < estimate.stderr < 0.1            # a usable error bar, not one wide enough to pass anything
    assert abs(estimate.log_z - exact) <= 3 * estimate.stderr, (estimate.log_z, exact, estimate.stderr)


def test_ais_with_too_few_intermediate_distributions_is_visibly_worse():
    """The test above can fail: 3 intermediate distributions leave a biased estimate and a large error bar."""
    weight, b, c = _random_rbm(12, 8, seed=0, scale=2.0)
    exact = exact_log_partition(weight, b, c)
    rough = ais_log_partition(weight, b, c, torch.zeros(12), num_runs=200, num_betas=3,
                              generator=torch.Generator().manual_seed(0))
    fine = ais_log_partition(weight, b, c, torch.zeros(12), num_runs=200, num_betas=3000,
                             generator=torch.Generator().manual_seed(0))
    assert abs(fine.log_z - exact) < abs(rough.log_z - exact)
    assert rough.stderr > 5 * fine.stderr


def test_gibbs_sampling_converges_to_the_enumerated_distribution():
    weight, b, c = _random_rbm(4, 3, seed=3, scale=1.5)
    v_all = _all_states(4)
    exact = torch.softmax(-free_energy(v_all, weight, b, c), 0)                          # (16,)
    independent = torch.ones(16, dtype=torch.float64)
    for i in range(4):  # the product of the exact marginals: what a sampler ignoring correlations would give
        p_i = (exact * v_all[:, i]).sum()
        independent = independent * torch.where(v_all[:, i] > 0, p_i, 1 - p_i)
    assert 0.5 * (exact - independent).abs().sum() > 0.05   # the RBM's correlations are there to be found

    num_chains = 20000
    generator = torch.Generator().manual_seed(0)
    start = torch.bernoulli(torch.full((num_chains, 4), 0.5, dtype=torch.float64), generator=generator)
    samples, _ = gibbs_chain(start, 50, weight, b, c, generator=generator)
    index = (samples * 2 ** torch.arange(3, -1, -1, dtype=torch.float64)).sum(1).long()  # row of v_all
    counts = torch.bincount(index, minlength=16).double()
    chi2 = stats.chisquare(counts.numpy(), (exact * num_chains).numpy())
    assert chi2.pvalue > 1e-3, chi2
    assert stats.chisquare(counts.numpy(), (independent * num_chains).numpy()).pvalue < 1e-6


def _tiny_rbm(**overrides) -> RBM:
    torch.manual_seed(0)
    config = RBMConfig(**{"num_hidden": 6, "num_chains": 8, "ais_runs": 50, "ais_betas": 500, **overrides})
    model = RBM(config, ImageSpec(1, 3, 4))   # 12 visible + 6 hidden units: enumerable
    with torch.no_grad():
        model.weight.normal_(0.0, 1.0)
        model.visible_bias.normal_(0.0, 1.0)
    return model


def test_log_likelihood_is_minus_free_energy_minus_the_prepared_log_z_and_refreshes_after_an_update():
    model = _tiny_rbm()
    images = torch.randint(0, 2, (5, 1, 3, 4), dtype=torch.uint8) * 255
    prepared = model.prepare_likelihood(torch.Generator().manual_seed(0))
    log_z = model._cached_estimate().log_z
    assert f"log Z_hat = {log_z:.3f}" in prepared.how
    v = images.flatten(1).float() / 255
    expected = -free_energy(v, model.weight, model.visible_bias, model.hidden_bias) - log_z
    assert torch.allclose(model.log_likelihood(images), expected, atol=1e-5)
    exact = exact_log_partition(model.weight, model.visible_bias, model.hidden_bias)
    assert abs(log_z - exact) <= max(3 * prepared.stderr_nats, 1e-3)
    with torch.no_grad():
        model.hidden_bias.add_(1.0)       # new weights: the cached estimate no longer applies
    v_energy = free_energy(v, model.weight, model.visible_bias, model.hidden_bias)
    new_exact = exact_log_partition(model.weight, model.visible_bias, model.hidden_bias)
    refreshed = model.log_likelihood(images, generator=torch.Generator().manual_seed(1))
    assert abs(new_exact - exact) > 2                                     # a stale log Z would be far off
    assert torch.allclose(refreshed, -v_energy - new_exact, atol=0.3)     # a fresh (rougher) AIS run is close


def test_binarization_keeps_black_and_white_and_draws_grey_as_bernoulli():
    model = _tiny_rbm()
    black_white = torch.tensor([0, 255] * 6, dtype=torch.uint8).view(1, 1, 3, 4).expand(2000, -1, -1, -1)
    assert torch.equal(model.binarize(black_white, torch.Generator().manual_seed(0)),
                       black_white.flatten(1).float() / 255)
    grey = torch.full((2000, 1, 3, 4), 64, dtype=torch.uint8)
    frequency = model.binarize(grey, torch.Generator().manual_seed(0)).mean()
    assert abs(float(frequency) - 64 / 255) < 0.01


def test_pcd_gradient_is_the_data_minus_model_statistics():
    """d/db of mean F(data) - mean F(chains) = mean v_chains - mean v_data (the visible-bias PCD update)."""
    model = _tiny_rbm(cd_steps=1)
    images = torch.randint(0, 2, (6, 1, 3, 4), dtype=torch.uint8) * 255
    torch.manual_seed(5)
    model.loss(images)["loss"].backward()
    expected = model.chains.mean(0) - images.flatten(1).float().div(255).mean(0)   # chains already advanced
    assert torch.allclose(model.visible_bias.grad, expected, atol=1e-6)


def test_after_fit_stores_the_training_marginals_as_the_base_rate():
    model = _tiny_rbm()
    images = torch.zeros(100, 1, 3, 4, dtype=torch.uint8)
    images[:75, 0, 0, 0] = 255
    model.after_fit(images, torch.Generator().manual_seed(0))
    probs = torch.sigmoid(model.base_visible_bias)
    assert probs[0] == pytest.approx(0.75, abs=1e-3) and probs[1] == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(float(model.base_visible_bias[1]))


def test_plain_sampling_draws_binary_images_with_the_same_weights():
    model = _tiny_rbm(gibbs_steps=5)
    plain = model.plain_sampling()
    assert plain is not None and plain.plain_sampling() is None
    shown = model.sample(50, torch.Generator().manual_seed(0))
    drawn = plain.sample(50, torch.Generator().manual_seed(0))
    assert set(drawn.unique().tolist()) == {0, 255}
    assert len(shown.unique()) > 2                          # conditional means: grey levels
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_weight_averaging_replaces_the_last_weights_by_their_running_mean_after_training():
    from genai_models.base import Precision, TrainSettings

    model = _tiny_rbm(weight_average=0.9)
    settings = TrainSettings(learning_rate=0.05)
    optimizers, precision = model.configure_optimizers(settings), Precision(torch.device("cpu"), enabled=False)
    images = torch.randint(0, 2, (8, 1, 3, 4), dtype=torch.uint8) * 255
    iterates = []
    for _ in range(3):   # fewer updates than 1 / (1 - decay): the average is still the plain mean
        model.training_step(images, optimizers, precision, settings)
        iterates.append(model.weight.detach().clone())
    model.after_fit(images, torch.Generator().manual_seed(0))
    assert torch.allclose(model.weight, torch.stack(iterates).mean(0), atol=1e-6)
    assert not torch.allclose(model.weight, iterates[-1])
