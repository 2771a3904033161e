"""Deterministic convolutional autoencoder made a generator by a Gaussian mixture on its latent codes.

Ghosh, Sajjadi, Vergari, Black & Schölkopf, "From Variational to Deterministic Autoencoders",
ICLR 2020 (arXiv:1903.12436): a regularised autoencoder (RAE: reconstruction + beta/2 |z|^2, with
weight decay as the decoder regulariser) and, after training, an ex-post density estimator
fitted to the training set's codes; sampling draws a code from it and decodes. The density here
is a full-covariance Gaussian mixture fitted by EM (Dempster, Laird & Rubin 1977), as in RAE's
"GMM" sampler and pythae's ``GaussianMixtureSampler``.

The encoder and decoder have the shape of ``vae.VAE`` (two stride-2 convolutions and a hidden
layer each way) with one deterministic code per image, no KL term, and a decoder that outputs
pixel values directly (squared error in [-1, 1] units). There is no likelihood: the decoder is
deterministic, so the model puts no probability mass on images. Samples are judged by FID and
the other sample metrics only.

Training runs through the default step; the mixture is fitted once afterwards by ``after_fit``
(the training step calls it after the loop) and kept as buffers, so it is saved with the weights.
Before that the sampler is N(0, I) (how the untrained model of the FID ceiling samples).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from genai_models.base import GenerativeModel, ImageSpec, check_sizes, images_to_unit, unit_to_images

log = logging.getLogger(__name__)


@dataclass
class AEGMMConfig:
    latent_dim: int = 16
    base_channels: int = 32
    hidden_dim: int = 256
    latent_penalty: float = 0.01      # beta of RAE's beta/2 |z|^2 (keeps the codes compact)
    mixture_components: int = 10      # K of the latent Gaussian mixture
    mixture_iterations: int = 200     # EM iterations of the mixture fit (stops early at convergence)
    covariance_floor: float = 1e-4    # added to each covariance's diagonal, relative to the codes' mean variance

    def __post_init__(self) -> None:
        check_sizes(self, {"latent_dim": 4096, "base_channels": 1024, "hidden_dim": 65536, "mixture_components": 10_000,
                           "mixture_iterations": 1_000_000, "covariance_floor": 1e6})
        if self.latent_penalty < 0:
            raise ValueError(f"latent_penalty must be >= 0, got {self.latent_penalty}")


@dataclass
class GaussianMixture:
    """Mixture parameters: ``logits`` (K,), ``means`` (K, d), ``scale_tril`` (K, d, d) Cholesky factors."""

    logits: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) of points (N, d) -> (N,)."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x; mu_k, Sigma_k), (N, K)."""
        d = x.shape[1]
        diff = (x[None] - self.means[:, None]).transpose(1, 2)                        # (K, d, N)
        white = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)     # (K, d, N)
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)           # (K,) = log|Sigma|/2
        log_normal = -0.5 * white.pow(2).sum(1) - log_det[:, None] - 0.5 * d * math.log(2 * math.pi)
        return (torch.log_softmax(self.logits, 0)[:, None] + log_normal).T


def kmeans_plus_plus(x: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (num_points,) of rows of x (N, d) chosen by k-means++ seeding."""
    def draw(weights: torch.Tensor) -> int:
        return int(torch.multinomial(weights.to(generator.device), 1, generator=generator))

    chosen = [draw(torch.ones(x.shape[0], dtype=x.dtype, device=x.device))]
    nearest = (x - x[chosen[0]]).pow(2).sum(1)                                   # (N,) squared distances
    for _ in range(num_points - 1):
        # All remaining points may coincide with chosen ones (duplicates): then pick uniformly.
        chosen.append(draw(nearest if nearest.sum() > 0 else torch.ones_like(nearest)))
        nearest = torch.minimum(nearest, (x - x[chosen[-1]]).pow(2).sum(1))
    return torch.tensor(chosen, device=x.device)


def fit_gaussian_mixture(x: torch.Tensor, num_components: int, iterations: int, covariance_floor: float,
                         generator: torch.Generator, tolerance: float = 1e-6) -> tuple[GaussianMixture, float]:
    """Full-covariance Gaussian mixture by EM, in float64; returns it and its mean train log-likelihood.

    Starts from K data points chosen by k-means++ seeding (Arthur & Vassilvitskii 2007: each next one
    with probability proportional to its squared distance from those already chosen) as means, the
    data covariance for every component and equal weights; stops when the mean log-likelihood gains
    less than ``tolerance``. ``covariance_floor`` times the data's mean variance is added to every diagonal,
    which keeps a component that collapses onto a few points positive definite.

    Args:
        x: (N, d) points, N >= num_components.
    """
    x = x.double()
    n, d = x.shape
    if n < num_components:
        raise ValueError(f"cannot fit {num_components} mixture components to {n} points")
    start = kmeans_plus_plus(x, num_components, generator)
    centered = x - x.mean(0)
    data_cov = centered.T @ centered / n
    floor = covariance_floor * data_cov.diagonal().mean() * torch.eye(d, dtype=x.dtype, device=x.device)
    mixture = GaussianMixture(torch.zeros(num_components, dtype=x.dtype, device=x.device), x[start].clone(),
                              torch.linalg.cholesky(data_cov + floor).expand(num_components, d, d).clone())
    previous = -math.inf
    for _ in range(iterations):
        log_joint = mixture.component_log_probs(x)                                   # (N, K)
        mean_log_likelihood = float(torch.logsumexp(log_joint, 1).mean())
        if mean_log_likelihood - previous < tolerance:
            break
        previous = mean_log_likelihood
        resp = torch.softmax(log_joint, dim=1)                                         # (N, K) E-step
        counts = resp.sum(0) + 1e-10                                                   # (K,)
        means = resp.T @ x / counts[:, None]                                           # (K, d) M-step
        diff = x[None] - means[:, None]                                                # (K, N, d)
        covariances = torch.einsum("kn,kni,knj->kij", resp.T, diff, diff) / counts[:, None, None] + floor
        mixture = GaussianMixture(torch.log(counts / n), means, torch.linalg.cholesky(covariances))
    return mixture, float(mixture.log_prob(x).mean())


class AEGMM(GenerativeModel):
    modality = "image"
    has_likelihood = False

    def __init__(self, config: AEGMMConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        if spec.height % 4 or spec.width % 4:
            raise ValueError(f"ae_gmm needs image sides divisible by 4, got {spec.height}x{spec.width}")
        ch, c, k, d = config.base_channels, spec.channels, config.mixture_components, config.latent_dim
        self.feature_shape = (2 * ch, spec.height // 4, spec.width // 4)
        flat = math.prod(self.feature_shape)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, ch, 4, 2, 1), nn.SiLU(),          # (B, ch, H/2, W/2)
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.SiLU(),     # (B, 2ch, H/4, W/4)
            nn.Flatten(), nn.Linear(flat, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, d),               # (B, latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(d, config.hidden_dim), nn.SiLU(), nn.Linear(config.hidden_dim, flat), nn.SiLU(),
            nn.Unflatten(1, self.feature_shape),
            nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.SiLU(),  # (B, ch, H/2, W/2)
            nn.ConvTranspose2d(ch, c, 4, 2, 1),                  # (B, C, H, W) in [-1, 1] units
        )
        # The latent sampler: N(0, I) until ``after_fit`` fits the mixture (buffers: saved in checkpoints).
        self.register_buffer("mixture_logits", torch.zeros(k))
        self.register_buffer("mixture_means", torch.zeros(k, d))
        self.register_buffer("mixture_scale_tril", torch.eye(d).expand(k, d, d).clone())
        self.register_buffer("mixture_fitted", torch.zeros((), dtype=torch.bool))

    def describe(self) -> str:
        return f"{self.config.latent_dim}-d codes, {self.config.mixture_components}-component latent mixture"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> codes (B, latent_dim)."""
        return self.encoder(images_to_unit(images))

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """RAE objective per image: squared error summed over pixels ([-1, 1] units) + beta/2 |z|^2."""
        z = self.encode(batch)
        reconstruction = (self.decoder(z).float() - images_to_unit(batch)).pow(2).flatten(1).sum(1)   # (B,)
        penalty = 0.5 * z.float().pow(2).sum(1)
        return {"loss": (reconstruction + self.config.latent_penalty * penalty).mean(),
                "reconstruction": reconstruction.mean().detach(), "latent_norm": penalty.mean().detach()}

    @torch.no_grad()
    def after_fit(self, train_data: torch.Tensor, generator: torch.Generator) -> None:
        """Fit the latent mixture to the codes of every training image (eval mode, batches of 500)."""
        was_training = self.training
        self.eval()
        codes = torch.cat([self.encode(train_data[i:i + 500].to(self.device)).float()
                           for i in range(0, train_data.shape[0], 500)])                  # (N, latent_dim)
        self.train(was_training)
        mixture, mean_ll = fit_gaussian_mixture(codes, self.config.mixture_components,
                                                self.config.mixture_iterations, self.config.covariance_floor,
                                                generator)
        self.mixture_logits.copy_(mixture.logits)
        self.mixture_means.copy_(mixture.means)
        self.mixture_scale_tril.copy_(mixture.scale_tril)
        self.mixture_fitted.fill_(True)
        log.info("ae_gmm: %d-component mixture fitted to %d codes (mean log-likelihood %.3f nats per code)",
                 self.config.mixture_components, codes.shape[0], mean_ll)

    def describe_sampling(self) -> str:
        if bool(self.mixture_fitted):
            return f"decoded codes drawn from the {self.config.mixture_components}-component mixture of the training codes"
        return "decoded codes drawn from N(0, I) (no mixture fitted yet)"

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Component ~ pi, z = mu_k + L_k eps, decoded and rounded to uint8."""
        device = generator.device
        weights = torch.softmax(self.mixture_logits.to(device), 0)
        component = torch.multinomial(weights, num_samples, replacement=True, generator=generator)     # (N,)
        eps = torch.randn(num_samples, self.config.latent_dim, 1, generator=generator, device=device)
        component, eps = component.to(self.device), eps.to(self.device)
        z = self.mixture_means[component] + (self.mixture_scale_tril[component] @ eps).squeeze(-1)    # (N, d)
        return unit_to_images(self.decoder(z).float())
