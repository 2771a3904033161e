"""Denoising diffusion probabilistic model: a U-Net denoiser, a noise schedule and two samplers.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239):
linear beta schedule, epsilon prediction trained with L_simple, ancestral sampling (Algorithm
2, reverse variance sigma_t^2 = beta_t), the variational bound with a discretized Gaussian
decoder at t = 1 (Eq. 5 and 13). Deterministic sampler: Song, Meng & Ermon, "Denoising
Diffusion Implicit Models", ICLR 2021 (arXiv:2010.02502), Eq. 12 (eta = 0 is deterministic).
Fewer sampling steps than training steps, and the cosine noise schedule (``beta_schedule:
cosine``, Eq. 17): Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML
2021 (arXiv:2102.09672), Sec. 3.2 and 4. Self-attention at the lowest U-Net resolution
(``attention: true``), as in Ho et al. (at 16x16) after the PixelCNN++ / Transformer block.

The three pieces are kept apart: ``UNet`` (the network eps_theta(x_t, t)), ``NoiseSchedule``
(betas and everything derived from them, plus the bound's terms) and the samplers
``ancestral_sample`` / ``ddim_sample`` (free functions of a network, a schedule and x_T).

Bound: -log p(x_0) <= L_T + sum_{t=2..T} L_{t-1} + L_0 in nats of the 8-bit data (pixels
scaled to [-1, 1], bins of width 2/255). ``log_likelihood`` returns an unbiased Monte-Carlo
estimate of minus that sum, see ``NoiseSchedule.negative_bound``; being an estimate of a
bound it is reported as -ELBO only (more samples lower its variance, not the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import GenerativeModel, ImageSpec, check_sizes, images_to_unit, unit_to_images


@dataclass
class DDPMConfig:
    base_channels: int = 16        # U-Net width at full resolution (x2 at the two lower ones)
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4       # linear: for 1000 steps; scaled by 1000 / num_train_timesteps
    beta_end: float = 0.02
    attention: bool = False        # a self-attention block at the lowest resolution (H/4)
    sampler: Literal["ancestral", "ddim"] = "ddim"
    sample_steps: int = 10         # <= num_train_timesteps; fewer steps respace the schedule
    ddim_eta: float = 0.0          # 0: deterministic DDIM; 1: DDPM-like noise
    bound_samples: int = 4         # stratified Monte-Carlo draws (t, noise) per image for the bound in evaluation

    def __post_init__(self) -> None:
        check_sizes(self, {"base_channels": 1024, "num_train_timesteps": 100_000, "sample_steps": 100_000,
                           "bound_samples": 100_000})
        if self.base_channels % 4:
            raise ValueError(f"base_channels must be divisible by 4 (group norm), got {self.base_channels}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.sample_steps > self.num_train_timesteps:
            raise ValueError(f"sample_steps must be <= num_train_timesteps ({self.num_train_timesteps}), "
                             f"got {self.sample_steps}")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {self.beta_schedule!r}")
        if self.sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got {self.sampler!r}")
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")


# --- the network -------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of integer timesteps (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 skip when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = nn.GroupNorm(4, out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual: (B, C, H, W) -> (B, C, H, W).

    GroupNorm, 1x1 query/key/value, softmax(q k^T / sqrt(C)) v, a 1x1 output projection that
    starts near zero (the block starts close to the identity, as Ho et al.'s zero-initialised one;
    small rather than zero so that every weight gets a gradient at step 1).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C) each
        attended = F.scaled_dot_product_attention(q, k, v)                            # (B, HW, C)
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta: (B, C, H, W) noisy images and (B,) timesteps -> (B, C, H, W) predicted noise.

    Three resolutions (H, H/2, H/4) with widths (ch, 2ch, 2ch), one residual block per level
    on the way down and up, skip connections by concatenation; with ``attention``, a
    self-attention block after the middle residual block (H/4, e.g. 7x7 = 49 positions).
    """

    def __init__(self, channels: int, ch: int, attention: bool = False) -> None:
        super().__init__()
        self.ch, emb = ch, 4 * ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, emb)                                   # (B, ch, H, W)
        self.pool1 = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)           # (B, 2ch, H/2, W/2)
        self.down2 = ResBlock(2 * ch, 2 * ch, emb)
        self.pool2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)       # (B, 2ch, H/4, W/4)
        self.mid = ResBlock(2 * ch, 2 * ch, emb)
        self.mid_attention = SelfAttention(2 * ch) if attention else nn.Identity()
        self.up2 = ResBlock(4 * ch, 2 * ch, emb)                             # after concat at H/2
        self.up1 = ResBlock(3 * ch, ch, emb)                                 # after concat at H
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.ch))
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid_attention(self.mid(self.pool2(h2), emb))
        h = self.up2(torch.cat([F.interpolate(h, size=h2.shape[-2:]), h2], dim=1), emb)
        h = self.up1(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1), emb)
        return self.out(h)


# --- the noise schedule and the bound -------------------------------------------------------
def _gather(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values (T,) at timesteps t (B,) -> (B, 1, 1, 1) for broadcasting over images."""
    return values.to(t.device)[t].view(-1, 1, 1, 1)


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al.'s linear betas (T,), float64; scaled by 1000 / T so alpha_bar_T stays near the 1000-step one."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2).

    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), (T,) float64 (clipped at 0.999 by the caller).
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]


class NoiseSchedule(nn.Module):
    """Betas (linear or cosine); index i = 0..T-1 is the paper's t = i + 1. Buffers are float64-derived."""

    def __init__(self, num_timesteps: int, beta_start: float, beta_end: float, kind: str = "linear") -> None:
        super().__init__()
        betas = cosine_betas(num_timesteps) if kind == "cosine" else linear_betas(num_timesteps, beta_start, beta_end)
        betas = betas.clamp(max=0.999)  # very short schedules would reach beta = 1 (Nichol & Dhariwal)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        for name, value in {
            "betas": betas, "alphas_cumprod": alphas_cumprod,
            # q(x_{t-1} | x_t, x_0): variance beta~_t and the two mean coefficients (Eq. 7)
            "posterior_variance": betas * (1 - previous) / (1 - alphas_cumprod),
            "posterior_coef_x0": betas * previous.sqrt() / (1 - alphas_cumprod),
            "posterior_coef_xt": (1 - betas).sqrt() * (1 - previous) / (1 - alphas_cumprod),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        # Proposal over t = 2..T for the bound's Monte-Carlo estimate: proportional to the weight
        # of ||eps - eps_theta||^2 in L_{t-1}, beta_t / (2 alpha_t (1 - alpha_bar_t)) (sigma_t^2 = beta_t).
        weight = (betas / (2 * (1 - betas) * (1 - alphas_cumprod)))[1:]
        self.register_buffer("bound_proposal", (weight / weight.sum()).float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(a_bar) x_0, (1 - a_bar) I) (Eq. 4); x0, noise (B, C, H, W), t (B,)."""
        a_bar = _gather(self.alphas_cumprod, t)
        return a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise

    def reverse_mean(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - a_bar_t) eps) / sqrt(alpha_t) (Eq. 11)."""
        beta, a_bar = _gather(self.betas, t), _gather(self.alphas_cumprod, t)
        return (xt - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) summed over dims, (B,)."""
        a_bar = self.alphas_cumprod[-1].double()
        mean_sq, var = a_bar * x0.double().pow(2), 1 - a_bar
        return 0.5 * (mean_sq + var - 1 - var.log()).flatten(1).sum(1)

    def decoder_nll(self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """L_0 = -log N_disc(x_0; mu_theta(x_1, 1), beta_1), one draw of x_1 ~ q(x_1 | x_0), (B,)."""
        one = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        x1 = self.add_noise(x0, _randn(x0.shape, generator, x0.device), one)
        mean = self.reverse_mean(x1, denoiser(x1, one), one)
        return -discretized_gaussian_log_prob(x0, mean, self.betas[0].sqrt()).flatten(1).sum(1)

    def diffusion_kl(self, denoiser: nn.Module, x0: torch.Tensor, t: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for indices t >= 1 (B,), one x_t draw."""
        xt = self.add_noise(x0, _randn(x0.shape, generator, x0.device), t)
        true_mean = _gather(self.posterior_coef_x0, t) * x0 + _gather(self.posterior_coef_xt, t) * xt
        var_q, var_p = _gather(self.posterior_variance, t).double(), _gather(self.betas, t).double()
        mean_sq = (true_mean - self.reverse_mean(xt, denoiser(xt, t), t)).double().pow(2)
        return 0.5 * (var_p.log() - var_q.log() + (var_q + mean_sq) / var_p - 1).flatten(1).sum(1)

    def negative_bound(self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None,
                       num_draws: int = 1) -> torch.Tensor:
        """Unbiased estimate of L_T + sum_{t=2..T} L_{t-1} + L_0 in nats, (B,); x0 (B, C, H, W) on the 8-bit grid.

        L_T in closed form; L_0 and the sum over t averaged over ``num_draws`` draws. The sum is
        importance-sampled, L_{t-1} / q(t) with t ~ q = ``bound_proposal``, and stratified: draw j
        takes t from the j-th of ``num_draws`` equal-probability slices of q (inverse CDF of
        (j + U) / num_draws), which keeps the estimate unbiased and lowers its variance.
        Every term is >= 0, so is the estimate.
        """
        b, device = x0.shape[0], x0.device
        u = (torch.arange(num_draws, device=_dev(generator, device))[:, None]
             + torch.rand(num_draws, b, generator=generator, device=_dev(generator, device))) / num_draws
        cdf = self.bound_proposal.double().cumsum(0).to(u.device)
        t = 1 + torch.searchsorted(cdf, u.double(), right=True).clamp(max=cdf.shape[0] - 1).to(device)  # (k, B)
        total = torch.zeros(b, dtype=torch.float64, device=device)
        for j in range(num_draws):
            kl = self.diffusion_kl(denoiser, x0, t[j], generator) / self.bound_proposal.double()[t[j] - 1]
            total += kl + self.decoder_nll(denoiser, x0, generator).double()
        return self.prior_kl(x0) + total / num_draws


def _randn(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_dev(generator, device)).to(device)


def _dev(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log of the N(mean, std^2) mass of each pixel's bin; x on the grid {-1, -1 + 2/255, ..., 1}.

    Bins have width 2/255; the first and last extend to -inf / +inf (Ho et al. Eq. 13).
    """
    x, mean = x.double(), mean.double()
    upper = torch.where(x > 1 - 1e-6, torch.full_like(x, math.inf), (x + 1 / 255 - mean) / std)
    lower = torch.where(x < -1 + 1e-6, torch.full_like(x, -math.inf), (x - 1 / 255 - mean) / std)
    # log(Phi(upper) - Phi(lower)), computed on the side of the distribution where it does not cancel
    flip = (lower + upper) > 0
    lo, hi = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=-1e-12)))


# --- samplers ------------------------------------------------------------------------------
def sampling_timesteps(num_train: int, num_steps: int) -> list[int]:
    """``num_steps`` indices into the training schedule, evenly spaced, ending at T-1, ascending."""
    return sorted({round(i * (num_train - 1) / max(num_steps - 1, 1)) for i in range(num_steps)})


@torch.no_grad()
def ancestral_sample(denoiser: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, timesteps: list[int],
                     generator: torch.Generator) -> torch.Tensor:
    """Ho et al. Algorithm 2 on the respaced schedule (betas from consecutive alpha_bars); x = x_T."""
    a_bar = schedule.alphas_cumprod
    for i in reversed(range(len(timesteps))):
        t = torch.full((x.shape[0],), timesteps[i], dtype=torch.long, device=x.device)
        prev = a_bar[timesteps[i - 1]] if i > 0 else torch.ones((), device=x.device)
        beta = 1 - a_bar[timesteps[i]] / prev
        eps = denoiser(x, t)
        x = (x - beta / (1 - a_bar[timesteps[i]]).sqrt() * eps) / (1 - beta).sqrt()
        if i > 0:
            x = x + beta.sqrt() * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return x


@torch.no_grad()
def ddim_sample(denoiser: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, timesteps: list[int],
                generator: torch.Generator, eta: float = 0.0) -> torch.Tensor:
    """Song et al. Eq. 12 with x_0 predictions clipped to [-1, 1]; eta = 0 draws no noise at all."""
    a_bar = schedule.alphas_cumprod
    for i in reversed(range(len(timesteps))):
        t = torch.full((x.shape[0],), timesteps[i], dtype=torch.long, device=x.device)
        a_t = a_bar[timesteps[i]]
        a_prev = a_bar[timesteps[i - 1]] if i > 0 else torch.ones((), device=x.device)
        eps = denoiser(x, t)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clipped x_0
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return x


# --- the family ----------------------------------------------------------------------------
class DDPM(GenerativeModel):
    modality = "image"
    has_likelihood = True
    likelihood_is_bound = True

    def __init__(self, config: DDPMConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        if spec.height % 4 or spec.width % 4:
            raise ValueError(f"DDPM's U-Net needs image sides divisible by 4, got {spec.height}x{spec.width}")
        self.denoiser = UNet(spec.channels, config.base_channels, config.attention)
        self.schedule = NoiseSchedule(config.num_train_timesteps, config.beta_start, config.beta_end,
                                      config.beta_schedule)

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_simple: mean squared error of the predicted noise, per pixel, t ~ U{1..T}."""
        x0 = images_to_unit(batch)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return {"loss": F.mse_loss(self.denoiser(self.schedule.add_noise(x0, noise, t), t), noise)}

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Minus an unbiased estimate of the variational bound, nats per image (B,), from
        ``importance_samples`` stratified draws (more draws lower the variance, not the bound)."""
        return -self.schedule.negative_bound(self.denoiser, images_to_unit(batch), generator,
                                             importance_samples).float()

    def likelihood_bounds(self, iw_samples: int) -> dict[str, tuple[int, str]]:
        k = self.config.bound_samples
        return {"_elbo": (k, f"-ELBO: the DDPM variational bound L_0 + ... + L_T (discretized Gaussian "
                             f"decoder), unbiased Monte-Carlo estimate, {k} draw(s) of (t, noise) per image, "
                             f"t importance-sampled and stratified over {self.schedule.num_timesteps} steps")}

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """x_T ~ N(0, I), then the configured sampler over ``sample_steps`` steps."""
        shape = (num_samples, self.spec.channels, self.spec.height, self.spec.width)
        x = torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        steps = sampling_timesteps(self.schedule.num_timesteps, self.config.sample_steps)
        was_training = self.training
        self.eval()
        if self.config.sampler == "ddim":
            x = ddim_sample(self.denoiser, self.schedule, x, steps, generator, self.config.ddim_eta)
        else:
            x = ancestral_sample(self.denoiser, self.schedule, x, steps, generator)
        self.train(was_training)
        return unit_to_images(x)
