"""Wasserstein GAN with gradient penalty.

Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville, "Improved Training of Wasserstein GANs",
NeurIPS 2017 (arXiv:1704.00028), Algorithm 1: the critic maximises E[D(x)] - E[D(G(z))]
under the soft 1-Lipschitz constraint lambda * E[(||grad D(x_hat)||_2 - 1)^2] on random
interpolates x_hat of real and generated images; n_critic critic iterations per generator
iteration; Adam(lr 1e-4, betas (0, 0.9)); no batch normalization in the critic (the penalty
is per example), batch normalization in the generator. Networks: the DCGAN-style pair of the
``dcgan`` family (its ``LatentImageGAN`` generator, twice as wide), without the critic's batch norm.

One ``training_step`` is one critic iteration (a fresh real batch each, as in Algorithm 1);
every ``n_critic``-th step (steps 1, n_critic + 1, ...) is followed by one generator update, so
``train.steps`` counts critic iterations. The returned terms: ``discriminator`` (the critic
objective, penalty included), ``generator`` (-E[D(G(z))]), their sum ``loss`` (logging only,
as in ``dcgan``), ``wasserstein`` (the critic's estimate E[D(x)] - E[D(G(z))] of the
Wasserstein-1 distance, the curve the paper recommends watching) and ``gradient_penalty``
(unweighted). No likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from genai_models.base import ImageSpec, Precision, TrainSettings, check_sizes, fast_optimizer_options, images_to_unit
from genai_models.dcgan import LatentImageGAN


@dataclass
class WGANGPConfig:
    latent_dim: int = 64
    base_channels: int = 32
    n_critic: int = 5                     # critic iterations per generator iteration
    gradient_penalty_weight: float = 10.0  # lambda

    def __post_init__(self) -> None:
        check_sizes(self, {"latent_dim": 4096, "base_channels": 1024, "n_critic": 100})
        if self.gradient_penalty_weight < 0:
            raise ValueError(f"gradient_penalty_weight must be >= 0, got {self.gradient_penalty_weight}")


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     mix: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] over x_hat = mix * real + (1 - mix) * fake, a scalar.

    real, fake (B, C, H, W); mix (B, 1, 1, 1) in [0, 1]. Differentiable w.r.t. the critic's
    parameters (double backpropagation); works under ``torch.no_grad`` callers too.
    """
    with torch.enable_grad():
        x_hat = (mix * real + (1 - mix) * fake).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class WGANGP(LatentImageGAN):
    def __init__(self, config: WGANGPConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec, width=4 * config.base_channels)
        ch, c, h, w = config.base_channels, spec.channels, spec.height // 4, spec.width // 4
        self.critic = nn.Sequential(
            nn.Conv2d(c, ch, 4, 2, 1), nn.LeakyReLU(0.2),                # (B, ch, H/2, W/2)
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2),           # (B, 2ch, H/4, W/4)
            # (B, 1) scores, not logits. No bias: the objective and the penalty ignore a constant shift.
            nn.Flatten(), nn.Linear(2 * ch * h * w, 1, bias=False),
        )
        # Critic iterations done so far (a buffer: saved with the weights, so resuming keeps the rhythm).
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.long))
        # Its value on the host, read once: reading the buffer every step would wait for the GPU each time.
        self._critic_steps_host: int | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._critic_steps_host = None  # critic_steps may have changed: read it again

    def _terms(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both players' objectives and the critic's parts; real, fake (B, C, H, W) in [-1, 1]."""
        real_score, fake_score = self.critic(real).mean(), self.critic(fake).mean()
        mix = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        penalty = gradient_penalty(self.critic, real, fake, mix)
        critic_loss = fake_score - real_score + self.config.gradient_penalty_weight * penalty
        return {"loss": critic_loss - fake_score, "discriminator": critic_loss, "generator": -fake_score,
                "wasserstein": real_score - fake_score, "gradient_penalty": penalty}

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both players' objectives on one batch; ``loss`` is their sum (for logging only, as in dcgan)."""
        return self._terms(images_to_unit(batch), self.generator(self._noise(batch.shape[0])))

    def configure_optimizers(self, settings: TrainSettings) -> list[torch.optim.Optimizer]:
        """Two Adams with the learning rate and betas of params.yaml (the paper: 1e-4, (0.0, 0.9))."""
        return [
            torch.optim.Adam(self.critic.parameters(), lr=settings.learning_rate, betas=settings.betas,
                             **fast_optimizer_options(self.critic.parameters())),
            torch.optim.Adam(self.generator.parameters(), lr=settings.learning_rate, betas=settings.betas,
                             **fast_optimizer_options(self.generator.parameters())),
        ]

    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings,
    ) -> dict[str, torch.Tensor]:
        """One critic iteration; then one generator iteration if this is step 1, n_critic + 1, ..."""
        critic_opt, generator_opt = optimizers
        real = images_to_unit(batch)
        with torch.no_grad(), precision.autocast():
            fake = self.generator(self._noise(batch.shape[0]))
        # The penalty's double backward runs in fp32: it is a small, precision-sensitive term.
        terms = self._terms(real, fake.float())
        precision.backward_and_step(terms["discriminator"], critic_opt, self.critic.parameters(), settings.grad_clip)
        if self._critic_steps_host is None:
            self._critic_steps_host = int(self.critic_steps)
        if self._critic_steps_host % self.config.n_critic == 0:
            with precision.autocast():
                generator_loss = -self.critic(self.generator(self._noise(batch.shape[0]))).mean()
            precision.backward_and_step(generator_loss, generator_opt, self.generator.parameters(),
                                        settings.grad_clip)
        self.critic_steps += 1
        self._critic_steps_host += 1
        return {name: value.detach().float() for name, value in terms.items()}
