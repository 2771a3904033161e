"""Likelihood-based metrics: bits/dim, perplexity, and the 8-bit discretized logistic.

Discretized logistic: Salimans et al. 2017, "PixelCNN++: Improving the PixelCNN
with Discretized Logistic Mixture Likelihood and Other Modifications",
https://arxiv.org/abs/1701.05517 (here in pixel units 0..255, one component).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)


def nats_to_bits_per_dim(
    nats_per_example: float | np.ndarray | torch.Tensor, num_dims: int
) -> float:
    """Mean negative log-likelihood per example (nats) -> bits per dimension.

    Args:
        nats_per_example: NLL in nats of each example, any shape (e.g. (B,)), or a
            single already-averaged float. The mean is taken in float64.
        num_dims: dimensions per example, e.g. C * H * W for images.

    Returns:
        ``mean(nats_per_example) / (num_dims * ln 2)``.

    Raises:
        ValueError: if ``num_dims`` is not a positive int or no values are given.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims <= 0:
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    if isinstance(nats_per_example, torch.Tensor):
        values = nats_per_example.detach().to("cpu", torch.float64).numpy()
    else:
        values = np.asarray(nats_per_example, dtype=np.float64)
    if values.size == 0:
        raise ValueError("nats_per_example is empty")
    return float(values.mean() / (num_dims * _LN2))


def log_mean_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable ``log(mean(exp(x), dim))`` = ``logsumexp(x, dim) - log(n)``.

    Used e.g. for importance-weighted likelihood bounds: x is (K, B) log-weights,
    ``log_mean_exp(x, 0)`` is the (B,) bound.

    Raises:
        ValueError: if ``x`` has no elements along ``dim``.
    """
    n = x.shape[dim]
    if n == 0:
        raise ValueError(f"log_mean_exp over an empty dim {dim} of shape {tuple(x.shape)}")
    return torch.logsumexp(x, dim=dim) - math.log(n)


def perplexity(total_nats: float, num_tokens: int) -> float:
    """``exp(total_nats / num_tokens)``; ``inf`` if that overflows a float.

    Args:
        total_nats: summed token-level NLL in nats.
        num_tokens: number of predicted tokens the sum is over.

    Raises:
        ValueError: if ``num_tokens <= 0``.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    try:
        return math.exp(total_nats / num_tokens)
    except OverflowError:
        return math.inf


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Log-probability of 8-bit pixel values under a discretized logistic.

    A logistic with location ``mean`` and scale ``exp(log_scale)`` (both in pixel
    units) is integrated over each value's bin: [v-0.5, v+0.5] for 1..254,
    (-inf, 0.5] for 0 and [254.5, inf) for 255, so the 256 probabilities sum to 1.

    Interior bins use the exact identity, with a = (v+0.5-mean)/s, b = (v-0.5-mean)/s:

        sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(-(a - b)))

    i.e. ``logsigmoid(a) + logsigmoid(-b) + log(-expm1(-1/s))``. Every term is
    computed without cancellation, so far-tail bins and tiny bins stay accurate
    and finite. This is why the PixelCNN++ fallback to the log-density at the
    bin midpoint (used there when the sigmoid difference drops below 1e-5) is not
    needed: that fallback repairs a cancellation this form does not have.

    Args:
        x: (B, C, H, W) pixel values 0..255, uint8 or float (not range-checked:
            that would force a device sync).
        mean: location in pixel units, broadcastable to x.
        log_scale: log of the logistic scale in pixel units, broadcastable to x.

    Returns:
        Per-element log-probabilities in nats, same shape as x, dtype of mean.

    Raises:
        ValueError: if mean or log_scale would broadcast x to a larger shape.
    """
    out_shape = torch.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    if out_shape != x.shape:
        raise ValueError(
            f"mean {tuple(mean.shape)} and log_scale {tuple(log_scale.shape)} must "
            f"broadcast to x's shape {tuple(x.shape)}, got {tuple(out_shape)}"
        )
    dtype = torch.promote_types(mean.dtype, log_scale.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    x = x.to(dtype)

    inv_scale = torch.exp(-log_scale.to(dtype))
    centered = x - mean.to(dtype)  # (B, C, H, W)
    upper = inv_scale * (centered + 0.5)  # standardised upper bin edge
    lower = inv_scale * (centered - 0.5)  # standardised lower bin edge

    log_cdf_upper = F.logsigmoid(upper)  # log P(X <= v + 0.5): the bin of 0
    log_sf_lower = F.logsigmoid(-lower)  # log P(X >= v - 0.5): the bin of 255
    # bin width 1 / scale = upper - lower, taken from inv_scale to avoid cancellation
    log_width_term = torch.log(-torch.expm1(-inv_scale))
    log_interior = log_cdf_upper + log_sf_lower + log_width_term

    return torch.where(
        x < 0.5, log_cdf_upper, torch.where(x > 254.5, log_sf_lower, log_interior)
    )


def dequantized_log_likelihood(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    importance_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Lower bound on log P(x) of 8-bit images from a density on [0, 1)^D (uniform dequantization).

    With y = (x + u) / 256, u ~ U[0, 1)^D, the probability of the discrete image is
    P(x) = 256^-D E_u[p(y)], so (Jensen; Theis, van den Oord & Bethge 2016, arXiv:1511.01844)

        log P(x) >= log mean_k p(y_k) - D log 256,

    for k = ``importance_samples`` independent draws: k = 1 is the usual dequantization bound
    (the ELBO with a uniform q(u|x)); larger k is the importance-weighted bound (Burda et al.
    2016), which tightens towards log P(x) as k grows.

    Args:
        log_density: (N, C, H, W) float in [0, 1) -> (N,) log p(y) in nats.
        images: uint8 (B, C, H, W) in 0..255.
        importance_samples: k >= 1 draws of u per image.
        generator: source of u (its device is used to draw, the result moves to images' device).

    Returns:
        (B,) the bound in nats.
    """
    if importance_samples < 1:
        raise ValueError(f"importance_samples must be >= 1, got {importance_samples}")
    k, b, num_dims = importance_samples, images.shape[0], images[0].numel()
    repeated = images.unsqueeze(0).expand(k, *images.shape).reshape(k * b, *images.shape[1:])  # (k*B, C, H, W)
    noise_device = generator.device if generator is not None else images.device
    u = torch.rand(repeated.shape, generator=generator, device=noise_device).to(images.device)
    log_p = log_density((repeated.float() + u) / 256.0).view(k, b)                             # (k, B)
    return log_mean_exp(log_p, dim=0) - num_dims * math.log(256.0)
