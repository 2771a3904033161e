"""Gated PixelCNN: an autoregressive model with a 256-way softmax for every sub-pixel.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu, "Conditional Image
Generation with PixelCNN Decoders", NeurIPS 2016 (arXiv:1606.05328); masked convolutions and
the R -> G -> B channel order: van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent
Neural Networks", ICML 2016 (arXiv:1601.06759).

p(x) = prod_i p(x_i | x_<i) in raster order (row by row, left to right, then channel by
channel inside a pixel), so ``log_likelihood`` is the exact log-probability of the 8-bit data.

Two stacks remove the blind spot of the original masked PixelCNN: the vertical stack sees
every pixel in the rows above (a (k//2+1) x k convolution, shifted down one row before it
feeds the horizontal stack), the horizontal stack sees the pixels to the left in the current
row (a 1 x (k//2+1) convolution). Channels: the hidden units form C groups, one per image
channel; at the current pixel, group c sees input channels < c in the first layer (mask A)
and hidden groups <= c afterwards (mask B). Only the centre tap of the horizontal stack and
the 1x1 convolutions carry that mask: everything else sees whole pixels before the current one.

Sampling runs the network once per sub-pixel but never over the whole image: the vertical
stack is advanced one row at a time (its rows above are cached), the horizontal stack runs on
the few columns to the left that can still influence the current pixel. This gives the same
conditionals as ``forward`` (a property test checks it) at a small fraction of the cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import GenerativeModel, ImageSpec, check_sizes, images_to_unit

log = logging.getLogger(__name__)

@dataclass
class PixelCNNConfig:
    hidden_channels: int = 32  # per stack; at least the number of image channels (split into C groups)
    num_layers: int = 5        # gated layers, the first (mask A) included
    kernel_size: int = 3       # odd: the vertical stack is (k//2+1) x k, the horizontal 1 x (k//2+1)

    def __post_init__(self) -> None:
        check_sizes(self, {"hidden_channels": 4096, "num_layers": 256, "kernel_size": 63})
        if self.kernel_size % 2 == 0 or self.kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")


def channel_groups(num_units: int, num_channels: int, gated: bool = False) -> torch.Tensor:
    """Image channel each unit belongs to: C contiguous blocks; a gated layer's two halves alike.

    Unit i of ``size`` goes to group floor(i * C / size): equal blocks when C divides ``size``
    (32 units, 1 channel: all in group 0), blocks one unit apart in size otherwise (32 units,
    RGB: 11, 11 and 10).
    """
    size = num_units // 2 if gated else num_units
    return (torch.arange(num_units) % size) * num_channels // size


class ChannelMaskedConv(nn.Conv2d):
    """1 x kw convolution over the current pixel and the kw-1 to its left, causal across channels.

    Only the last (centre) tap is masked: output group g sees input groups < g (mask A) or <= g (B).
    """

    def __init__(self, in_groups: torch.Tensor, out_groups: torch.Tensor, width: int, mask_type: str) -> None:
        super().__init__(len(in_groups), len(out_groups), (1, width))
        allowed = out_groups[:, None] > in_groups[None, :] if mask_type == "A" else \
            out_groups[:, None] >= in_groups[None, :]
        mask = torch.ones_like(self.weight)
        mask[:, :, 0, -1] = allowed.float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (self.kernel_size[1] - 1, 0, 0, 0)), self.weight * self.mask, self.bias)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> the same with row r holding row r-1 (zeros in row 0)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    """(B, 2h, H, W) -> tanh(first half) * sigmoid(second half), (B, h, H, W)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks (Fig. 2 of the paper, without the conditioning input)."""

    def __init__(self, in_channels: int, hidden: int, num_channels: int, kernel_size: int, first: bool) -> None:
        super().__init__()
        in_groups = channel_groups(in_channels, num_channels)
        gated_groups = channel_groups(2 * hidden, num_channels, gated=True)
        self.first, self.half = first, kernel_size // 2
        self.vertical = nn.Conv2d(in_channels, 2 * hidden, (self.half + 1, kernel_size))
        self.vertical_to_horizontal = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.horizontal = ChannelMaskedConv(in_groups, gated_groups, self.half + 1, "A" if first else "B")
        hidden_groups = channel_groups(hidden, num_channels)
        self.residual = None if first else ChannelMaskedConv(hidden_groups, hidden_groups, 1, "B")

    def vertical_pre(self, v: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, 2h, H, W); row r sees rows <= r of ``v``."""
        return self.vertical(F.pad(v, (self.half, self.half, self.half, 0)))

    def horizontal_out(self, h: torch.Tensor, from_vertical: torch.Tensor) -> torch.Tensor:
        """Horizontal stack; ``from_vertical`` is the projected, down-shifted vertical stack (B, 2h, H, W)."""
        out = gate(self.horizontal(h) + from_vertical)
        return out if self.first else h + self.residual(out)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.vertical_pre(v)
        return gate(pre), self.horizontal_out(h, self.vertical_to_horizontal(down_shift(pre)))


class PixelCNN(GenerativeModel):
    modality = "image"
    has_likelihood = True
    likelihood_is_bound = False

    def __init__(self, config: PixelCNNConfig, spec: ImageSpec) -> None:
        super().__init__(config, spec)
        c, hidden = spec.channels, config.hidden_channels
        if hidden < c:
            raise ValueError(f"hidden_channels must be at least the {c} image channels, got {hidden}")
        self.layers = nn.ModuleList(
            GatedLayer(c if i == 0 else hidden, hidden, c, config.kernel_size, first=i == 0)
            for i in range(config.num_layers)
        )
        hidden_groups, logit_groups = channel_groups(hidden, c), torch.arange(256 * c) // 256
        self.head = nn.Sequential(
            nn.ReLU(), ChannelMaskedConv(hidden_groups, hidden_groups, 1, "B"),
            nn.ReLU(), ChannelMaskedConv(hidden_groups, logit_groups, 1, "B"),  # (B, 256C, H, W)
        )
        # How far back the output of one pixel can look: rows above / columns to the left.
        self.reach = config.num_layers * (config.kernel_size // 2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (B, C, H, W) in [-1, 1] -> logits (B, C, 256, H, W) of every sub-pixel."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        return self._head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        b, _, height, width = h.shape
        return self.head(h).view(b, self.spec.channels, 256, height, width)

    def _log_prob(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> log p(x) in nats, (B,)."""
        logits = self.logits(images_to_unit(batch)).transpose(1, 2)  # (B, 256, C, H, W)
        return -F.cross_entropy(logits.float(), batch.long(), reduction="none").flatten(1).sum(1)

    # --- interface -------------------------------------------------------------------
    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact NLL in nats per image."""
        return {"loss": -self._log_prob(batch).mean()}

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact log p(x) of the 8-bit images in nats, (B,); needs no samples."""
        return self._log_prob(batch)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Sub-pixel by sub-pixel in raster order, all ``num_samples`` images at once."""
        c, height, width = self.spec.channels, self.spec.height, self.spec.width
        x = torch.zeros(num_samples, c, height, width, device=self.device)  # in [-1, 1]
        # Inputs of each layer's vertical convolution, filled row by row as the image is drawn.
        stack_inputs = [x] + [torch.zeros(num_samples, self.config.hidden_channels, height, width,
                                          device=self.device) for _ in self.layers[1:]]
        from_vertical = [layer.vertical_to_horizontal(torch.zeros(num_samples, 2 * self.config.hidden_channels,
                                                                  1, width, device=self.device))
                         for layer in self.layers]  # row 0 sees nothing above
        last_log = time.perf_counter()
        for row in range(height):
            for col in range(width):
                for channel in range(c):
                    logits = self.pixel_logits(x, row, col, from_vertical)[:, channel]  # (N, 256)
                    drawn = torch.multinomial(logits.float().softmax(-1), 1, generator=generator)
                    x[:, channel, row, col] = drawn.squeeze(1).to(x.dtype) / 127.5 - 1.0
            from_vertical = self._advance_vertical(stack_inputs, row)
            if time.perf_counter() - last_log >= 5.0:  # a batch can take minutes: say how far it is
                log.info("pixelcnn: drawing %d images, row %d of %d done", num_samples, row + 1, height)
                last_log = time.perf_counter()
        return ((x + 1.0) * 127.5).round().to(torch.uint8)

    def pixel_logits(self, x: torch.Tensor, row: int, col: int, from_vertical: list[torch.Tensor]) -> torch.Tensor:
        """Logits (N, C, 256) at (row, col) from the current row only; ``from_vertical``: (N, 2h, 1, W) per layer."""
        start = max(0, col - self.reach)
        h = x[:, :, row:row + 1, start:col + 1]
        for layer, v in zip(self.layers, from_vertical):
            h = layer.horizontal_out(h, v[..., start:col + 1])
        return self._head(h[..., -1:])[:, :, :, 0, 0]

    def _advance_vertical(self, stack_inputs: list[torch.Tensor], row: int) -> list[torch.Tensor]:
        """Row ``row`` is drawn: compute every layer's vertical stack there; returns what row+1 sees."""
        from_vertical, top = [], max(0, row - self.config.kernel_size // 2)
        for i, layer in enumerate(self.layers):
            pre = layer.vertical_pre(stack_inputs[i][:, :, top:row + 1])[:, :, -1:]  # (N, 2h, 1, W)
            from_vertical.append(layer.vertical_to_horizontal(pre))
            if i + 1 < len(self.layers):
                stack_inputs[i + 1][:, :, row:row + 1] = gate(pre)
        return from_vertical
