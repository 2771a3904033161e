"""The one interface every generator family answers, and the default training step.

A family is a ``GenerativeModel`` subclass plus a config dataclass. The training loop
and the evaluation step only ever call the methods defined here, so they never need
to know which family they are driving.

Data conventions (shared by every family):

- images are ``uint8`` tensors of shape (B, C, H, W) with values 0..255, both as
  training batches and as the output of ``sample``;
- text is a ``long`` tensor of token ids of shape (B, L): ``bos``, the tokens,
  ``eos``, then ``pad`` up to L.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal

import torch
from torch import nn

from genai_models.metrics.likelihood import dequantized_log_likelihood

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class ImageSpec:
    """Shape of the image data a model is built for."""

    channels: int
    height: int
    width: int

    @property
    def num_dims(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class TextSpec:
    """Vocabulary and sequence length of the text data a model is built for."""

    vocab_size: int
    max_len: int  # including bos and eos
    pad_id: int
    bos_id: int
    eos_id: int


DataSpec = ImageSpec | TextSpec


@dataclass(frozen=True)
class PreparedLikelihood:
    """What ``GenerativeModel.prepare_likelihood`` estimated once for a whole evaluation."""

    stderr_nats: float  # standard error it adds to every example's log-likelihood (e.g. that of log Z_hat)
    how: str            # how it was made (runs, steps, the estimate itself)


@dataclass
class TrainSettings:
    """What the default optimizer set-up needs to know (built from params by tasks)."""

    learning_rate: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None


class Precision:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler); fp32 elsewhere."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device_type = device.type
        self.enabled = enabled and device.type == "cuda"
        use_bf16 = self.enabled and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if use_bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and not use_bf16)

    @property
    def name(self) -> str:
        return f"amp-{str(self.dtype).removeprefix('torch.')}" if self.enabled else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterator[nn.Parameter] | None = None,
        grad_clip: float | None = None,
    ) -> None:
        """Backward pass, optional gradient clipping, optimizer step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if grad_clip is not None and params is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()


def fast_optimizer_options(parameters: Iterable[nn.Parameter]) -> dict[str, Any]:
    """Keyword arguments for torch's Adam/AdamW that make the update fast where that is available.

    On CUDA: ``fused=True`` (the whole update in a few kernels instead of a few per parameter).
    Elsewhere: nothing, i.e. torch's default implementation and its exact numerics.
    """
    params = list(parameters)
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


class GenerativeModel(nn.Module):
    """Base class of every family.

    Subclasses set ``modality`` and ``has_likelihood`` and implement ``loss`` and
    ``sample``; families with a likelihood implement ``log_likelihood``. Families with
    more than one optimizer (GANs) override ``configure_optimizers`` and ``training_step``.
    """

    modality: ClassVar[Modality]
    has_likelihood: ClassVar[bool] = False
    # True when ``log_likelihood`` is a lower bound (ELBO / IWAE) rather than exact.
    likelihood_is_bound: ClassVar[bool] = False
    # Whether the family trains data-parallel (one process per GPU, gradients averaged): it uses the
    # default ``training_step``, whose ``loss_fn`` the trainer can route through DistributedDataParallel,
    # and nothing in its step depends on the whole batch at once (no batch norm, no data-dependent start).
    supports_data_parallel: ClassVar[bool] = True
    # True when ``log_likelihood`` is a stochastic estimate (e.g. with an AIS estimate of log Z): neither
    # exact nor a bound. Evaluation reports it under the keys of ``likelihood_bounds``, never as exact.
    likelihood_is_estimate: ClassVar[bool] = False
    # True for a model of black/white pixels: it reads 8-bit levels as Bernoulli probabilities
    # (level / 255) and its likelihood is that of binarized images.
    binary_pixels: ClassVar[bool] = False

    def __init__(self, config: Any, spec: DataSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> str:
        """A few words on the model's size for the report (e.g. "128 hidden states"); "" for none."""
        return ""

    # --- the questions every family answers -------------------------------------------
    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective of one batch: a dict holding at least ``"loss"`` (a scalar)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``num_samples`` samples (uint8 images or token ids) using ``generator``."""
        raise NotImplementedError

    def describe_sampling(self) -> str:
        """What ``sample`` returns, in words, for the report (e.g. "decoder means of z ~ N(0, I)")."""
        return "draws from the model"

    def plain_sampling(self) -> "GenerativeModel | None":
        """This model drawing *plain* samples, when ``sample`` is not plain; else None.

        Plain means a draw from the model's own distribution: not decoder means, not a
        temperature below 1, no truncation. When ``sample`` does something else, evaluation
        measures both, and the plain draw is the number that compares across families.
        """
        return None

    def log_likelihood(self, batch: torch.Tensor, importance_samples: int = 1) -> torch.Tensor:
        """Log-likelihood of each example in nats, shape (B,).

        Images: of the discrete 8-bit pixel values, summed over all C*H*W dims.
        Text: of the tokens after ``bos`` up to and including ``eos``.
        Families whose likelihood is a bound use ``importance_samples`` (1 = ELBO).
        """
        raise NotImplementedError(f"{type(self).__name__} has no likelihood")

    def likelihood_bounds(self, iw_samples: int) -> dict[str, tuple[int, str]]:
        """Bound and estimate families: what evaluation reports, as metric suffix -> (importance_samples, how
        it is made).

        The default is the pair of a latent-variable model: the ELBO and the importance-weighted
        bound with ``iw_samples`` samples. A family whose bound does not tighten with more samples
        (e.g. a diffusion model's bound, estimated by Monte Carlo) reports only ``_elbo``.
        """
        return {"_elbo": (1, "-ELBO (k=1)"), "_iwae": (iw_samples, f"IWAE bound, k={iw_samples}")}

    def prepare_likelihood(self, generator: torch.Generator) -> "PreparedLikelihood | None":
        """Work ``log_likelihood`` needs once per evaluation, before it is called on test batches (e.g.
        estimating a partition function), and the uncertainty it leaves in every log-likelihood.
        The default needs nothing."""
        return None

    # --- training ------------------------------------------------------------------------
    def loss_weight(self, batch: torch.Tensor) -> torch.Tensor | None:
        """How much ``batch`` counts in the average that ``loss`` takes, for data-parallel training.

        None (the default): ``loss`` is a mean over the batch's examples, so equal shares of a
        global batch weigh the same. A family whose loss averages over something else returns
        that count as a scalar tensor (the LM: its real target tokens), and each process's
        loss is re-weighted so that averaging gradients gives the global batch's gradient.
        """
        return None

    def after_fit(self, train_data: torch.Tensor, generator: torch.Generator) -> None:
        """Called once by the training step after the optimisation loop, with the whole training split
        (uint8 images or token ids, on the CPU) and a seeded generator: for fits that follow training
        (e.g. a density on latent codes). Whatever it sets must be parameters or buffers, so it is saved
        with the checkpoint. The default does nothing."""

    def configure_optimizers(self, settings: TrainSettings) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.AdamW(
                self.parameters(), lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay,
                **fast_optimizer_options(self.parameters()),
            )
        ]

    def training_step(
        self, batch: torch.Tensor, optimizers: list[torch.optim.Optimizer], precision: Precision,
        settings: TrainSettings, loss_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch``; returns the detached loss terms (on the batch's device).

        ``loss_fn`` computes the terms of a batch in place of ``self.loss``: the trainer passes a
        DistributedDataParallel wrapper of it when training on several processes.
        """
        (optimizer,) = optimizers
        with precision.autocast():
            terms = (loss_fn or self.loss)(batch)
        precision.backward_and_step(terms["loss"], optimizer, self.parameters(), settings.grad_clip)
        return {name: value.detach().float() for name, value in terms.items()}


class DequantizedDensityModel(GenerativeModel):
    """An image family with a density p(y) on [0, 1)^D of dequantized pixels y = (x + u) / 256.

    Subclasses (flows, mixtures) implement ``log_density``. Training minimises the one-draw
    uniform-dequantization bound on -log P(x); evaluation reports that bound and its
    importance-weighted version over k draws of u (``dequantized_log_likelihood``).
    """

    modality = "image"
    has_likelihood = True
    likelihood_is_bound = True  # exact density of the dequantized data; a bound for the discrete data

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) in nats of dequantized images y (B, C, H, W) in [0, 1) -> (B,)."""
        raise NotImplementedError

    def loss(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dequantization bound on -log P(x), nats per image (one draw of u)."""
        y = (batch.float() + torch.rand(batch.shape, device=batch.device)) / 256.0
        return {"loss": -(self.log_density(y) - self.spec.num_dims * math.log(256.0)).mean()}

    @torch.no_grad()
    def log_likelihood(
        self, batch: torch.Tensor, importance_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Lower bound on log P(x) of the 8-bit images, (B,): k draws of the dequantization noise."""
        return dequantized_log_likelihood(self.log_density, batch, importance_samples, generator)

    def likelihood_bounds(self, iw_samples: int) -> dict[str, tuple[int, str]]:
        return {"_elbo": (1, "uniform-dequantization bound (k=1 draw of u; the -ELBO with uniform q(u|x))"),
                "_iwae": (iw_samples, f"importance-weighted dequantization bound, k={iw_samples}")}


def check_sizes(config: Any, limits: dict[str, int | float]) -> None:
    """Raise ``ValueError`` unless ``0 < config.<name> <= limit`` for every name in ``limits``.

    The upper bounds keep a typo (``latent_dim: 1000000000000``) from asking for petabytes or
    looping for days before anything can report it; they sit far above any sensible setting.
    """
    for name, limit in limits.items():
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if value > limit:
            raise ValueError(f"{name} must be <= {limit}, got {value}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A family config dataclass as a plain dict (for checkpoints and JSON)."""
    return dataclasses.asdict(config)


def spec_to_dict(spec: DataSpec) -> dict[str, Any]:
    return {"kind": "image" if isinstance(spec, ImageSpec) else "text", **dataclasses.asdict(spec)}


def spec_from_dict(data: dict[str, Any]) -> DataSpec:
    fields = {k: v for k, v in data.items() if k != "kind"}
    return ImageSpec(**fields) if data["kind"] == "image" else TextSpec(**fields)


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (B, C, H, W), rounded to the nearest level."""
    return x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


LOG2 = math.log(2.0)
