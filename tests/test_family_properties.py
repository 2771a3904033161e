"""Property tests where a family's math promises something exact.

Flows invert and their log-determinants match autograd's Jacobian; PixelCNN is causal in
raster order (across channels too) with no blind spot, and its incremental sampler sees the
same conditionals as the full network; the diffusion schedule has its known values and the
DDIM sampler with eta = 0 is deterministic; the gradient penalty vanishes exactly for a
1-Lipschitz linear critic; the mixture density equals scipy's and integrates to one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from genai_models.base import ImageSpec, Precision, TrainSettings
from genai_models.ddpm import (
    DDPM, DDPMConfig, NoiseSchedule, ancestral_sample, ddim_sample, discretized_gaussian_log_prob,
    sampling_timesteps,
)
from genai_models.gmm import mfa_log_density
from genai_models.metrics.likelihood import dequantized_log_likelihood
from genai_models.pixelcnn import PixelCNN, PixelCNNConfig
from genai_models.realnvp import RealNVP, RealNVPConfig
from genai_models.wgan_gp import WGANGP, WGANGPConfig, gradient_penalty
from tests.conftest import tiny_batch


# --- RealNVP --------------------------------------------------------------------------------
def _random_flow(channels: int = 1, side: int = 4) -> RealNVP:
    """A float64 flow far from the identity (the real init is near it, which would test little)."""
    torch.manual_seed(0)
    model = RealNVP(RealNVPConfig(hidden_channels=8, final_couplings=2), ImageSpec(channels, side, side)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("channels", [1, 3])
def test_flow_inverse_undoes_forward(channels):
    model = _random_flow(channels)
    x = torch.randn(5, channels, 4, 4, dtype=torch.float64)
    z, _ = model.flow(x)
    assert z.shape == (5, channels * 16)
    assert torch.allclose(model.flow.inverse(z, (channels, 4, 4)), x, atol=1e-10)
    z2 = torch.randn(5, channels * 16, dtype=torch.float64)
    assert torch.allclose(model.flow(model.flow.inverse(z2, (channels, 4, 4)))[0], z2, atol=1e-10)


def test_flow_log_determinant_matches_autograd_jacobian():
    model = _random_flow()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    _, log_det = model.flow(x)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: model.flow(v.view(1, 1, 4, 4))[0][0], x[i].flatten())
        assert jacobian.shape == (16, 16)
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jacobian)[1], atol=1e-8)


def test_flow_density_is_the_change_of_variables_through_the_logit():
    """log p(y) = log N(g(y)) + log|det dg/dy| with g the whole map pixels -> latents (autograd)."""
    model = _random_flow()
    y = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    latents = lambda v: model.flow(model._to_logit(v.view(1, 1, 4, 4))[0])[0][0]  # noqa: E731
    for i in range(2):
        z = latents(y[i].flatten())
        log_det = torch.linalg.slogdet(torch.autograd.functional.jacobian(latents, y[i].flatten()))[1]
        expected = -0.5 * (z.pow(2).sum() + 16 * math.log(2 * math.pi)) + log_det
        assert torch.allclose(model.log_density(y[i:i + 1])[0], expected, atol=1e-8)


def test_dequantization_bound_of_a_uniform_density_is_exactly_eight_bits_per_dim():
    images = tiny_batch("image", batch_size=4)
    for k in (1, 7):
        bound = dequantized_log_likelihood(lambda y: torch.zeros(y.shape[0]), images, k, torch.Generator())
        assert torch.allclose(bound, torch.full((4,), -64 * math.log(256.0)))


def test_flow_importance_weighted_bound_is_tighter_than_one_draw():
    model = _random_flow().float()
    batch = tiny_batch("image", batch_size=8)[:, :, :4, :4]
    one = torch.stack([model.log_likelihood(batch, 1, torch.Generator().manual_seed(s)) for s in range(50)]).mean()
    many = model.log_likelihood(batch, 64, torch.Generator().manual_seed(99)).mean()
    assert many > one + 0.1


# --- PixelCNN -------------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "hidden"), [(1, 8), (3, 24), (3, 26)])
def test_pixelcnn_is_causal_in_raster_order_without_a_blind_spot(channels, hidden):
    """d logits(r, c, ch) / d x is non-zero exactly on the sub-pixels before (r, c, ch).

    6 layers reach 6 rows up and 6 columns left, more than this 5 x 5 image, so every earlier
    sub-pixel must matter: a blind spot (e.g. the pixels up and to the right) would show as a zero.
    (About 8 hidden units per channel group, so that the head's ReLUs are not all off at one pixel;
    26 units split unevenly into groups of 9, 9 and 8.)
    """
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(hidden_channels=hidden, num_layers=6), ImageSpec(channels, 5, 5)).double()
    x = torch.rand(1, channels, 5, 5, dtype=torch.float64) * 2 - 1
    for r, c, ch in [(0, 0, 0), (2, 1, 0), (2, 3, channels - 1), (4, 4, channels // 2)]:
        inputs = x.clone().requires_grad_(True)
        model.logits(inputs)[0, ch, :, r, c].sum().backward()
        influence = inputs.grad[0].abs() > 0  # (C, H, W)
        earlier = torch.tensor([[[(rr, cc, k) < (r, c, ch) for cc in range(5)] for rr in range(5)]
                                for k in range(channels)])
        assert torch.equal(influence, earlier), f"pixel ({r}, {c}), channel {ch}"


def test_pixelcnn_channel_groups_are_contiguous_and_near_equal():
    from genai_models.pixelcnn import channel_groups

    assert channel_groups(32, 1).tolist() == [0] * 32
    assert channel_groups(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.bincount(channel_groups(32, 3)).tolist() == [11, 11, 10]
    assert channel_groups(8, 3, gated=True).tolist() == [0, 0, 1, 2] * 2  # both halves of a gate alike
    with pytest.raises(ValueError, match="at least the 3 image channels"):
        PixelCNN(PixelCNNConfig(hidden_channels=2), ImageSpec(3, 4, 4))


def test_pixelcnn_incremental_sampler_sees_the_full_network_conditionals():
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(hidden_channels=6, num_layers=3), ImageSpec(3, 6, 6)).double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64) * 2 - 1
    full = model.logits(x)                                                    # (B, C, 256, H, W)
    inputs = [x] + [torch.zeros(2, 6, 6, 6, dtype=torch.float64) for _ in model.layers[1:]]
    from_vertical = [layer.vertical_to_horizontal(torch.zeros(2, 12, 1, 6, dtype=torch.float64))
                     for layer in model.layers]
    for row in range(6):
        for col in range(6):
            assert torch.allclose(model.pixel_logits(x, row, col, from_vertical), full[..., row, col], atol=1e-12)
        from_vertical = model._advance_vertical(inputs, row)


# --- DDPM -----------------------------------------------------------------------------------
def test_linear_schedule_has_the_known_values_of_ho_et_al():
    schedule = NoiseSchedule(1000, 1e-4, 0.02)
    betas, a_bar = schedule.betas.double(), schedule.alphas_cumprod.double()
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert (betas.diff() > 0).all() and (a_bar.diff() < 0).all() and (a_bar > 0).all()
    # prod(1 - beta_t) of this schedule, computed in float64 with numpy: 4.0358e-05 (sqrt ~ 0.00635)
    assert a_bar[-1].item() == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-4)
    assert a_bar[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)
    # noise-free x_t = sqrt(a_bar_t) x_0: the posterior mean is sqrt(a_bar_{t-1}) x_0
    t = torch.arange(1, 1000)
    mean = schedule.posterior_coef_x0[t] + schedule.posterior_coef_xt[t] * schedule.alphas_cumprod[t].sqrt()
    assert torch.allclose(mean, schedule.alphas_cumprod[t - 1].sqrt(), atol=1e-5)
    assert schedule.posterior_variance[0] == 0 and (schedule.posterior_variance[1:] < schedule.betas[1:]).all()


def test_cosine_schedule_follows_nichol_and_dhariwal():
    schedule = NoiseSchedule(1000, 1e-4, 0.02, kind="cosine")
    s, t = 0.008, np.arange(1, 1001) / 1000
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731  (their Eq. 17)
    a_bar = schedule.alphas_cumprod.double().numpy()
    # every step but the last, where beta is clipped at 0.999 (their Sec. 3.2)
    assert np.allclose(a_bar[:-1], (f(t) / f(0))[:-1], rtol=1e-5, atol=1e-9)
    assert schedule.betas[-1].item() == pytest.approx(0.999) and (schedule.betas.double().diff() > 0).all()
    # slower start than the linear schedule: less noise at every early step
    linear = NoiseSchedule(1000, 1e-4, 0.02)
    assert (schedule.alphas_cumprod[:500] > linear.alphas_cumprod[:500]).all()


def test_unet_attention_block_starts_as_the_identity_and_then_mixes_positions():
    from genai_models.ddpm import SelfAttention

    torch.manual_seed(0)
    block, x = SelfAttention(8), torch.randn(2, 8, 3, 3)
    assert torch.allclose(block(x), x, atol=0.05)  # a near-zero output projection: close to the identity
    torch.nn.init.normal_(block.out.weight)
    y = x.clone().requires_grad_(True)
    block(y)[0, :, 0, 0].sum().backward()
    assert (y.grad[0].abs().sum(0) > 0).all() and (y.grad[1] == 0).all()  # all positions, same image only


def test_sampling_timesteps_cover_the_schedule():
    assert sampling_timesteps(1000, 1000) == list(range(1000))
    steps = sampling_timesteps(1000, 10)
    assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(steps)


def test_ddim_with_eta_zero_and_every_step_is_deterministic_and_ancestral_is_not():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(base_channels=8, num_train_timesteps=20, sample_steps=20), ImageSpec(1, 8, 8)).eval()
    x_t = torch.randn(3, 1, 8, 8)
    steps = sampling_timesteps(20, 20)
    run = lambda sampler, seed: sampler(model.denoiser, model.schedule, x_t.clone(), steps,  # noqa: E731
                                        torch.Generator().manual_seed(seed))
    assert torch.equal(run(ddim_sample, 1), run(ddim_sample, 2))
    assert not torch.equal(run(ancestral_sample, 1), run(ancestral_sample, 2))


def test_discretized_gaussian_sums_to_one_over_the_256_levels_and_matches_scipy():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(0.0, 0.01), (0.9, 0.3), (-1.2, 0.05)]:
        log_p = discretized_gaussian_log_prob(levels, torch.full_like(levels, mean), torch.tensor(std))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        edges = np.concatenate([[-np.inf], (levels[:-1] + 1 / 255).numpy(), [np.inf]])
        expected = np.diff(stats.norm.cdf(edges, loc=mean, scale=std))
        assert np.allclose(log_p.exp().numpy(), expected, atol=1e-12)


def test_ddpm_bound_estimator_is_unbiased():
    """The importance-sampled estimate (1 draw, or 4 stratified) equals L_T + L_0 + the sum over every t."""
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(base_channels=8, num_train_timesteps=20, sample_steps=5), ImageSpec(1, 8, 8)).eval()
    schedule, draws = model.schedule, 4000
    x0 = (tiny_batch("image", batch_size=2).float() / 127.5 - 1).repeat(draws, 1, 1, 1)  # (draws * 2, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    per_image = lambda values: values.view(draws, 2).mean(0)  # noqa: E731
    with torch.no_grad():
        sampled = per_image(schedule.negative_bound(model.denoiser, x0, g))
        stratified = per_image(schedule.negative_bound(model.denoiser, x0, g, num_draws=4))
        summed = per_image(schedule.prior_kl(x0) + schedule.decoder_nll(model.denoiser, x0, g))
        for t in range(1, 20):
            t_batch = torch.full((x0.shape[0],), t, dtype=torch.long)
            summed += per_image(schedule.diffusion_kl(model.denoiser, x0, t_batch, g))
    assert (sampled > 0).all()
    assert torch.allclose(sampled, summed, rtol=0.02)
    assert torch.allclose(stratified, summed, rtol=0.02)


# --- WGAN-GP --------------------------------------------------------------------------------
def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic_and_one_for_norm_two():
    torch.manual_seed(0)
    weight = torch.randn(1, 16, dtype=torch.float64)
    weight /= weight.norm()
    real, fake = torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randn(8, 1, 4, 4, dtype=torch.float64)
    mix = torch.rand(8, 1, 1, 1, dtype=torch.float64)
    unit = lambda x: x.flatten(1) @ weight.T + 3.0  # noqa: E731  1-Lipschitz, gradient norm exactly 1
    assert gradient_penalty(unit, real, fake, mix).item() == pytest.approx(0.0, abs=1e-12)
    assert gradient_penalty(lambda x: 2 * unit(x), real, fake, mix).item() == pytest.approx(1.0, abs=1e-12)


def test_wgan_gp_updates_the_generator_once_per_n_critic_steps_and_reports_the_wasserstein_estimate():
    torch.manual_seed(0)
    model = WGANGP(WGANGPConfig(latent_dim=8, base_channels=8, n_critic=3), ImageSpec(1, 8, 8))
    settings = TrainSettings(learning_rate=1e-3, betas=(0.0, 0.9))
    optimizers, precision = model.configure_optimizers(settings), Precision(torch.device("cpu"), enabled=False)
    batch, generator_updated = tiny_batch("image", batch_size=8), []
    for _ in range(7):
        before = [p.detach().clone() for p in model.generator.parameters()]
        terms = model.training_step(batch, optimizers, precision, settings)
        generator_updated.append(any(not torch.equal(b, p) for b, p in zip(before, model.generator.parameters())))
        assert {"wasserstein", "gradient_penalty", "discriminator", "generator"} <= set(terms)
        critic_objective = terms["discriminator"] - 10 * terms["gradient_penalty"]
        assert terms["wasserstein"].item() == pytest.approx(-critic_objective.item(), abs=1e-5)
    assert generator_updated == [True, False, False, True, False, False, True]


# --- GMM ------------------------------------------------------------------------------------
def _mixture(dims: int, rank: int, components: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(components, generator=g, dtype=torch.float64),
            torch.randn(components, dims, generator=g, dtype=torch.float64),
            0.7 * torch.randn(components, dims, rank, generator=g, dtype=torch.float64),
            0.5 * torch.randn(components, dims, generator=g, dtype=torch.float64) - 0.5)


@pytest.mark.parametrize(("dims", "rank"), [(1, 1), (2, 1), (5, 2)])
def test_mixture_of_factor_analysers_density_equals_scipy(dims, rank):
    logits, means, factors, log_std = _mixture(dims, rank)
    y = torch.randn(50, dims, dtype=torch.float64) * 2
    weights = torch.log_softmax(logits, 0).numpy()
    per_component = [stats.multivariate_normal(means[k].numpy(), (factors[k] @ factors[k].T
                     + torch.diag(torch.exp(2 * log_std[k]))).numpy()).logpdf(y.numpy()).reshape(50)
                     for k in range(3)]
    expected = logsumexp(np.stack(per_component) + weights[:, None], axis=0)
    assert np.allclose(mfa_log_density(y, logits, means, factors, log_std).numpy(), expected, atol=1e-10)


def test_mixture_density_integrates_to_one_in_two_dimensions():
    logits, means, factors, log_std = _mixture(2, 1)
    step = 0.02
    axis = torch.arange(-9, 9, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    total = mfa_log_density(grid, logits, means, factors, log_std).exp().sum() * step ** 2
    assert total.item() == pytest.approx(1.0, abs=1e-4)
