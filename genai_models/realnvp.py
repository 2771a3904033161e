"""RealNVP: a normalizing flow of affine coupling layers in a multi-scale architecture.

Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017
(arXiv:1605.08803). Uniform dequantization and its bound: Theis, van den Oord & Bethge, "A
note on the evaluation of generative models", ICLR 2016 (arXiv:1511.01844).

The flow is a bijection f of R^D with a tractable log-determinant; the model density of
the dequantized pixels y = (x + u) / 256 in (0, 1)^D is

    log p(y) = log N(f(s(y)); 0, I) + log|det df/ds| + log|det ds/dy|,

with s the logit pre-processing of the paper (Sec. 4.1). The NLL of the 8-bit data is
reported through the dequantization bound -log P(x) <= E_u[-log p(y)] + D log 256 and its
importance-weighted version over k draws of u (``DequantizedDensityModel`` in base.py), the same
convention the ``gmm`` family uses. Sampling inverts the flow: z ~ N(0, I) -> y -> x = floor(256 y).

Architecture (per scale but the last): 3 checkerboard couplings, squeeze (C, H, W) ->
(4C, H/2, W/2), 3 channel couplings, then half the channels are factored out to the prior;
the last scale has ``final_couplings`` checkerboard couplings. The masks alternate so that
every dimension is transformed. Batch normalization of the paper is left out: the flow stays
a pure function of its input (train and eval modes agree), which the property tests need.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import DequantizedDensityModel, ImageSpec, check_sizes


@dataclass
class RealNVPConfig:
    num_scales: int = 2         # image sides must be divisible by 2 ** (num_scales - 1)
    hidden_channels: int = 16   # width of each coupling's network
    num_blocks: int = 1         # residual blocks per coupling network
    final_couplings: int = 4    # checkerboard couplings at the last scale
    logit_alpha: float = 0.05   # y -> logit(alpha + (1 - 2 alpha) y), as in the paper
    # Evaluation: k of the importance-weighted dequantization bound is min(evaluate.iw_samples, this);
    # each draw costs a full pass through the flow.
    max_importance_samples: int = 4
    # Samples are z ~ N(0, T^2 I) through the inverse flow; T = 1 is the model's own distribution,
    # T < 1 the "reduced temperature" of Kingma & Dhariwal (Glow, 2018), sharper and less diverse.
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_sizes(self, {"num_scales": 8, "hidden_channels": 4096, "num_blocks": 64, "final_couplings": 64,
                           "max_importance_samples": 100_000, "sample_temperature": 100.0})
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in [0, 0.5), got {self.logit_alpha}")


def checkerboard(height: int, width: int, parity: int, device: torch.device) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 where (row + col) % 2 == parity: the half a coupling leaves unchanged."""
    rows, cols = torch.arange(height, device=device)[:, None], torch.arange(width, device=device)[None, :]
    return ((rows + cols) % 2 == parity).float().view(1, 1, height, width)


class CouplingNet(nn.Module):
    """(B, C_in, H, W) -> log-scale and shift (B, C_out, H, W) each: a small residual CNN."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1)
        ) for _ in range(num_blocks))
        self.out = nn.Conv2d(hidden, 2 * out_channels, 3, padding=1)
        # Near-identity start: small (not zero, so every weight gets a gradient at step 1) output weights.
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)
        self.scale = nn.Parameter(torch.ones(out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        log_scale, shift = self.out(F.relu(h)).chunk(2, dim=1)
        return self.scale * torch.tanh(log_scale), shift  # |log-scale| bounded: the inverse stays finite


class Coupling(nn.Module):
    """Affine coupling y_b = x_b * exp(s(x_a)) + t(x_a), x_a unchanged; a checkerboard or channel split."""

    def __init__(self, channels: int, hidden: int, num_blocks: int, kind: str, parity: int) -> None:
        super().__init__()
        self.kind, self.parity = kind, parity
        if kind == "checkerboard":
            self.net = CouplingNet(channels + 1, channels, hidden, num_blocks)  # + the mask as a channel
        else:
            self.net = CouplingNet(channels // 2, channels - channels // 2, hidden, num_blocks)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-scale and shift for the changing part, and the checkerboard mask (None for channels)."""
        if self.kind == "checkerboard":
            mask = checkerboard(x.shape[2], x.shape[3], self.parity, x.device).to(x.dtype)
            log_scale, shift = self.net(torch.cat([x * mask, mask.expand(x.shape[0], -1, -1, -1)], dim=1))
            return log_scale * (1 - mask), shift * (1 - mask), mask
        fixed = x.chunk(2, dim=1)[self.parity]
        log_scale, shift = self.net(fixed)
        return log_scale, shift, None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> transformed (B, C, H, W) and log|det| (B,)."""
        log_scale, shift, mask = self._params(x)
        if mask is not None:
            return x * log_scale.exp() + shift, log_scale.flatten(1).sum(1)
        halves = list(x.chunk(2, dim=1))
        halves[1 - self.parity] = halves[1 - self.parity] * log_scale.exp() + shift
        return torch.cat(halves, dim=1), log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_scale, shift, mask = self._params(y)  # the unchanged part is the same in x and y
        if mask is not None:
            return (y - shift) * (-log_scale).exp()
        halves = list(y.chunk(2, dim=1))
        halves[1 - self.parity] = (halves[1 - self.parity] - shift) * (-log_scale).exp()
        return torch.cat(halves, dim=1)


class MultiScaleFlow(nn.Module):
    """Bijection R^D -> R^D: (B, C, H, W) -> (B, D) latents, with the log-determinant."""

    def __init__(self, spec: ImageSpec, config: RealNVPConfig) -> None:
        super().__init__()
        hidden, blocks = config.hidden_channels, config.num_blocks
        self.scales, channels = nn.ModuleList(), spec.channels
        for _ in range(config.num_scales - 1):
            self.scales.append(nn.ModuleList(
                [Coupling(channels, hidden, blocks, "checkerboard", i % 2) for i in range(3)]
                + [Coupling(4 * channels, hidden, blocks, "channel", i % 2) for i in range(3)]))
            channels = 4 * channels - 2 * channels  # squeeze, then half is factored out
        self.final = nn.ModuleList(
            Coupling(channels, hidden, blocks, "checkerboard", i % 2) for i in range(config.final_couplings))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> z (B, D) and log|det dz/dx| (B,)."""
        log_det, factored = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), []
        for couplings in self.scales:
            for i, coupling in enumerate(couplings):
                if i == 3:
                    x = F.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
                x, ld = coupling(x)
                log_det = log_det + ld
            out, x = x.chunk(2, dim=1)
            factored.append(out.flatten(1))
        for coupling in self.final:
            x, ld = coupling(x)
            log_det = log_det + ld
        return torch.cat(factored + [x.flatten(1)], dim=1), log_det

    def inverse(self, z: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """z (B, D) -> x (B, C, H, W) of ``shape`` (C, H, W)."""
        c, h, w = shape
        sizes = []  # (channels, height, width) of what each scale factors out
        for _ in self.scales:
            c, h, w = 2 * c, h // 2, w // 2
            sizes.append((c, h, w))
        parts = list(z.split([math.prod(s) for s in sizes] + [c * h * w], dim=1))
        x = parts.pop().view(-1, c, h, w)
        for coupling in reversed(self.final):
            x = coupling.inverse(x)
        for couplings, size in zip(reversed(self.scales), reversed(sizes)):
            x = torch.cat([parts.pop().view(-1, *size), x], dim=1)
            for i in reversed(range(len(couplings))):
                x = couplings[i].inverse(x)
                if i == 3:
                    x = F.pixel_shuffle(x, 2)
        return x


class RealNVP(DequantizedDensityModel):
    def __init__(self, config: RealNVPConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        factor = 2 ** (config.num_scales - 1)
        if spec.height % factor or spec.width % factor:
            raise ValueError(f"num_scales {config.num_scales} needs image sides divisible by {factor}, "
                             f"got {spec.height}x{spec.width}")
        self.flow = MultiScaleFlow(spec, config)

    def _to_logit(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y in (0, 1)^D (B, C, H, W) -> s = logit(a + (1 - 2a) y) and log|det ds/dy| (B,)."""
        a = self.config.logit_alpha
        p = a + (1 - 2 * a) * y
        s = p.log() - (-p).log1p()
        log_det = (math.log(1 - 2 * a) - p.log() - (-p).log1p()).flatten(1).sum(1)
        return s, log_det

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) in nats of dequantized images y in (0, 1)^D, (B, C, H, W) -> (B,)."""
        s, log_det_logit = self._to_logit(y)
        z, log_det_flow = self.flow(s)
        log_prior = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
        return log_prior + log_det_flow + log_det_logit

    # --- interface (loss and log_likelihood: DequantizedDensityModel) ---------------------
    def likelihood_bounds(self, iw_samples: int) -> dict[str, tuple[int, str]]:
        return super().likelihood_bounds(min(iw_samples, self.config.max_importance_samples))

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """z ~ N(0, T^2 I) through the inverse flow and the inverse logit, then the pixel bin of y."""
        z = self.config.sample_temperature * torch.randn(num_samples, self.spec.num_dims, generator=generator,
                                                         device=generator.device)
        s = self.flow.inverse(z.to(self.device), (self.spec.channels, self.spec.height, self.spec.width))
        a = self.config.logit_alpha
        y = (torch.sigmoid(s) - a) / (1 - 2 * a)
        return (y * 256).floor().clamp(0, 255).to(torch.uint8)

    def describe_sampling(self) -> str:
        t = self.config.sample_temperature
        return "draws: z ~ N(0, I) through the inverse flow" if t == 1.0 else \
            f"z ~ N(0, {t:g}^2 I) (temperature {t:g}) through the inverse flow"

    def plain_sampling(self) -> "RealNVP | None":
        """Temperature-1 draws when ``sample`` uses another temperature; the same weights."""
        if self.config.sample_temperature == 1.0:
            return None
        plain = copy.copy(self)  # shares the flow; only the config differs
        plain.config = dataclasses.replace(self.config, sample_temperature=1.0)
        return plain
