"""Gaussian mixture baseline on pixels: a mixture of factor analysers (MFA).

Ghahramani & Hinton, "The EM Algorithm for Mixtures of Factor Analyzers", Tech. Rep.
CRG-TR-96-1, University of Toronto, 1996; mixtures of probabilistic PCA (the isotropic-noise
special case): Tipping & Bishop, Neural Computation 11(2), 1999; MFA as an image model
trained by gradient descent: Richardson & Weiss, "On GANs and GMMs", NeurIPS 2018
(arXiv:1805.12462).

Each of K components is a full-rank Gaussian on all D pixel dimensions,
N(mu_k, W_k W_k^T + Psi_k), with a rank-q factor loading W_k (D, q) and a diagonal noise
Psi_k (D,): a low-rank "PCA" part for the correlated structure plus an independent residual
on every dimension, so it is a proper density on R^D. Densities use the Woodbury identity
and the matrix determinant lemma: O(K D q) per image, never a D x D matrix.

It is fitted by Adam on the dequantized NLL, because the training loop hands out mini-batches
and the contract is a ``loss``; EM would need a custom step and full-batch statistics.
Two details make that work. (1) In 784 dimensions the responsibilities are nearly one-hot, so
components that start far from the data never receive gradient; as with k-means' random-point
initialisation, the first training step puts the means on K images of its batch and the noise
scales at the batch's per-pixel spread (a data-dependent initialisation, like Glow's actnorm).
(2) Adam moves every parameter by about the learning rate per step, and the log noise scales
must travel several nats while the means travel a fraction of a pixel range, so they get
``variance_lr_scale`` times the learning rate.

Likelihood: as for ``realnvp``, pixels are dequantized, y = (x + u) / 256 in [0, 1)^D, and
-log P(x) <= E_u[-log p(y)] + D log 256 (k = 1) or its importance-weighted version. The
Gaussian also puts mass outside [0, 1)^D; that mass is simply lost, which can only make the
reported bound worse, never better. Samples are y ~ p, x = floor(256 y) clipped to 0..255.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from genai_models.base import (
    DequantizedDensityModel, ImageSpec, Precision, TrainSettings, check_sizes, fast_optimizer_options,
)


@dataclass
class GMMConfig:
    num_components: int = 20      # K
    latent_dim: int = 8           # q: factors per component
    init_std: float = 0.3         # noise std of every pixel before the data-dependent initialisation
    min_std: float = 0.002        # floor of the noise std (pixel range 0..1)
    variance_lr_scale: float = 30.0
    # What ``sample`` returns: y = mu + W z + Psi^(1/2) eps (``draw``, the model's distribution) or
    # y = mu + W z without the per-pixel noise (``denoised``, how MFA samples are usually shown).
    sample_mode: Literal["draw", "denoised"] = "draw"

    def __post_init__(self) -> None:
        check_sizes(self, {"num_components": 10_000, "latent_dim": 1024, "init_std": 1e3, "min_std": 1e3,
                           "variance_lr_scale": 1e6})
        if self.sample_mode not in ("draw", "denoised"):
            raise ValueError(f"sample_mode must be 'draw' or 'denoised', got {self.sample_mode!r}")


def mfa_log_density(y: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, factors: torch.Tensor,
                    log_std: torch.Tensor) -> torch.Tensor:
    """log p(y) in nats under a mixture of factor analysers.

    Args:
        y: (N, D) points.
        logits: (K,) unnormalised log mixture weights.
        means: (K, D); factors: (K, D, q) loadings W_k; log_std: (K, D) log of sqrt(diag Psi_k).

    Returns:
        (N,) log sum_k pi_k N(y; mu_k, W_k W_k^T + Psi_k).
    """
    num_dims, q = means.shape[1], factors.shape[2]
    inv_var = torch.exp(-2 * log_std)                                               # (K, D)
    diff = y[None] - means[:, None]                                                 # (K, N, D)
    scaled = factors * inv_var[..., None]                                           # (K, D, q) Psi^-1 W
    inner = torch.eye(q, device=y.device, dtype=y.dtype) + factors.transpose(1, 2) @ scaled  # (K, q, q)
    chol = torch.linalg.cholesky(inner)
    projected = torch.linalg.solve_triangular(chol, (diff @ scaled).transpose(1, 2), upper=False)  # (K, q, N)
    # Woodbury: d^T C^-1 d = d^T Psi^-1 d - |L^-1 W^T Psi^-1 d|^2; lemma: log|C| = log|Psi| + log|I + W^T Psi^-1 W|
    mahalanobis = (diff.pow(2) * inv_var[:, None]).sum(-1) - projected.pow(2).sum(1)      # (K, N)
    log_det = 2 * log_std.sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)     # (K,)
    log_normal = -0.5 * (num_dims * math.log(2 * math.pi) + log_det[:, None] + mahalanobis)
    return torch.logsumexp(torch.log_softmax(logits, 0)[:, None] + log_normal, dim=0)


class GMM(DequantizedDensityModel):
    supports_data_parallel = False  # the data-dependent start would differ between processes

    def __init__(self, config: GMMConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        k, d, q = config.num_components, spec.num_dims, config.latent_dim
        self.logits = nn.Parameter(torch.zeros(k))
        self.means = nn.Parameter(0.5 + 0.1 * torch.randn(k, d))         # random: breaks the symmetry
        self.factors = nn.Parameter(0.01 * torch.randn(k, d, q))
        self.log_std = nn.Parameter(torch.full((k, d), math.log(config.init_std)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # saved: resuming skips it
        self._initialized_host: bool | None = None  # the buffer's value on the host, read once (not every step)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_host = None

    @torch.no_grad()
    def initialize_from(self, batch: torch.Tensor) -> None:
        """Means on K (dequantized) images of ``batch`` (repeated if it is smaller); noise std per pixel."""
        y = ((batch.float() + torch.rand(batch.shape, device=batch.device)) / 256.0).flatten(1)  # (B, D)
        self.means.copy_(y[torch.arange(self.config.num_components, device=y.device) % y.shape[0]])
        self.log_std.copy_(y.std(0).clamp(min=1 / 256).log().expand_as(self.log_std))
        self.initialized.fill_(True)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) of dequantized images y (B, C, H, W) in [0, 1) -> (B,) nats."""
        return mfa_log_density(y.flatten(1).float(), self.logits, self.means, self.factors, self._log_std())

    def _log_std(self) -> torch.Tensor:
        return self.log_std.clamp(min=math.log(self.config.min_std))

    # --- interface (loss and log_likelihood: DequantizedDensityModel) ---------------------
    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings,
    ) -> dict[str, torch.Tensor]:
        """The default step, preceded once by the data-dependent initialisation."""
        if self._initialized_host is None:
            self._initialized_host = bool(self.initialized)
        if not self._initialized_host:
            self.initialize_from(batch)
            self._initialized_host = True
        return super().training_step(batch, optimizers, precision, settings)

    def configure_optimizers(self, settings: TrainSettings) -> list[torch.optim.Optimizer]:
        """One AdamW; the log noise scales learn ``variance_lr_scale`` times faster (see the module doc)."""
        others = [self.logits, self.means, self.factors]
        return [torch.optim.AdamW(
            [{"params": others},
             {"params": [self.log_std], "lr": settings.learning_rate * self.config.variance_lr_scale}],
            lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay,
            **fast_optimizer_options(self.parameters()))]

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Component ~ pi, y = mu + W z + Psi^(1/2) eps (no eps term when ``denoised``), then the pixel bin of y."""
        device = generator.device
        component = torch.multinomial(torch.softmax(self.logits.detach().to(device), 0), num_samples,
                                      replacement=True, generator=generator).to(self.device)  # (N,)
        z = torch.randn(num_samples, self.config.latent_dim, 1, generator=generator, device=device).to(self.device)
        eps = torch.randn(num_samples, self.spec.num_dims, generator=generator, device=device).to(self.device)
        if self.config.sample_mode == "denoised":
            eps = torch.zeros_like(eps)  # drawn all the same: both modes use the generator alike
        y = self.means[component] + (self.factors[component] @ z).squeeze(-1) + self._log_std()[component].exp() * eps
        shape = (num_samples, self.spec.channels, self.spec.height, self.spec.width)
        return (y * 256).floor().clamp(0, 255).to(torch.uint8).view(shape)

    def describe_sampling(self) -> str:
        if self.config.sample_mode == "denoised":
            return "mu_k + W_k z of a component k ~ pi and z ~ N(0, I), without the per-pixel noise Psi_k"
        return "draws y ~ p (component, factors and per-pixel noise), x = floor(256 y)"

    def plain_sampling(self) -> "GMM | None":
        """Draws with the per-pixel noise when ``sample`` leaves it out; the same weights."""
        if self.config.sample_mode == "draw":
            return None
        plain = copy.copy(self)  # shares the parameters; only the config differs
        plain.config = dataclasses.replace(self.config, sample_mode="draw")
        return plain
