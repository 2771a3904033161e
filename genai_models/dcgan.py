"""Deep convolutional GAN with the non-saturating generator loss.

Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", ICLR 2016 (arXiv:1511.06434); the loss is the
non-saturating one of Goodfellow et al., NeurIPS 2014 (arXiv:1406.2661).

A GAN has no likelihood; it owns its update step (one discriminator step, then one
generator step, each with its own Adam optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import (
    GenerativeModel, ImageSpec, Precision, TrainSettings, check_sizes, fast_optimizer_options, images_to_unit,
    unit_to_images,
)


@dataclass
class DCGANConfig:
    latent_dim: int = 64
    base_channels: int = 64
    discriminator_lr_scale: float = 1.0  # discriminator lr = learning_rate * this

    def __post_init__(self) -> None:
        check_sizes(self, {"latent_dim": 4096, "base_channels": 1024, "discriminator_lr_scale": 1000.0})


class LatentImageGAN(GenerativeModel):
    """What both GAN families share: a generator from z ~ N(0, I) to images, and sampling through it.

    The generator is the DCGAN one (Radford et al., Fig. 1, scaled to small images): a linear layer
    to ``width`` channels at a quarter of the image size, then two stride-2 transposed convolutions
    (``width`` -> ``width / 2`` -> C) with batch norm and ReLU between, tanh at the end.
    """

    modality = "image"
    supports_data_parallel = False  # two players, each with its own step (and batch norm)

    def __init__(self, config, spec: ImageSpec, width: int) -> None:
        super().__init__(config, spec)
        if spec.height % 4 or spec.width % 4:
            raise ValueError(f"{type(self).__name__} needs image sides divisible by 4, got {spec.height}x{spec.width}")
        h, w = spec.height // 4, spec.width // 4
        self.generator = nn.Sequential(
            nn.Linear(config.latent_dim, width * h * w), nn.Unflatten(1, (width, h, w)),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),  # (B, w/2, H/2, W/2)
            nn.ConvTranspose2d(width // 2, spec.channels, 4, 2, 1), nn.Tanh(),                     # (B, C, H, W)
        )

    def _noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(n, self.config.latent_dim, generator=generator, device=device).to(self.device)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        was_training = self.training
        self.eval()
        images = unit_to_images(self.generator(self._noise(num_samples, generator)))
        self.train(was_training)
        return images


class DCGAN(LatentImageGAN):
    def __init__(self, config: DCGANConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec, width=2 * config.base_channels)
        ch, c, h, w = config.base_channels, spec.channels, spec.height // 4, spec.width // 4
        self.discriminator = nn.Sequential(
            nn.Conv2d(c, ch, 4, 2, 1), nn.LeakyReLU(0.2),                             # (B, ch, H/2, W/2)
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * ch * h * w, 1),                               # (B, 1) logits
        )
        self.apply(_dcgan_init)

    def _discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + \
            F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    def _generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both players' objectives on one batch; ``loss`` is their sum (for logging only)."""
        real = images_to_unit(batch)
        fake = self.generator(self._noise(batch.shape[0]))
        d_loss = self._discriminator_loss(real, fake.detach())
        g_loss = self._generator_loss(fake)
        return {"loss": d_loss + g_loss, "discriminator": d_loss, "generator": g_loss}

    def configure_optimizers(self, settings: TrainSettings) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)  # as in the DCGAN paper
        d_lr = settings.learning_rate * self.config.discriminator_lr_scale
        return [
            torch.optim.Adam(self.discriminator.parameters(), lr=d_lr, betas=betas,
                             **fast_optimizer_options(self.discriminator.parameters())),
            torch.optim.Adam(self.generator.parameters(), lr=settings.learning_rate, betas=betas,
                             **fast_optimizer_options(self.generator.parameters())),
        ]

    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings,
    ) -> dict[str, torch.Tensor]:
        """One discriminator step, then one generator step against the updated discriminator."""
        d_opt, g_opt = optimizers
        real = images_to_unit(batch)
        with precision.autocast():
            fake = self.generator(self._noise(batch.shape[0]))
            d_loss = self._discriminator_loss(real, fake.detach())
        precision.backward_and_step(d_loss, d_opt, self.discriminator.parameters(), settings.grad_clip)
        with precision.autocast():
            g_loss = self._generator_loss(fake)
        precision.backward_and_step(g_loss, g_opt, self.generator.parameters(), settings.grad_clip)
        d_loss, g_loss = d_loss.detach().float(), g_loss.detach().float()
        return {"loss": d_loss + g_loss, "discriminator": d_loss, "generator": g_loss}

def _dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) weights as in the paper; BatchNorm scale N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
