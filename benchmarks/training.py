"""Items 1 and 5: training throughput (ours vs a plain PyTorch loop, and MFU) and generation speed.

Every family in the registry is measured at its ``params.yaml`` model config and batch
size, on synthetic data with the default data's shapes (MNIST-5k images 1x28x28; Lee
news text: 2,893 tokens, sequences of up to 34). Both loops see the same data; "ours"
is the real ``Trainer.fit`` (batch_indices, ``training_step`` through ``Precision``,
``float()`` of each loss term, the finite check), "plain" calls the family's network
modules and loss math directly with a plain optimizer step (the likelihood families whose
objective is one loss call their own ``loss``: the comparison is the loop around it).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from benchmarks.common import Figure, timed
from genai_models.base import ImageSpec, TextSpec, images_to_unit
from genai_models.ema import ModelEMA
from genai_models.metrics.likelihood import discretized_logistic_log_prob
from genai_models.registry import REGISTRY
from genai_models.schedules import lr_schedulers
from genai_models.vae import kl_to_standard_normal
from genai_models.wgan_gp import gradient_penalty
from tasks.config import load_params
from tasks.train import Trainer, TrainingData, _settings

ITEM_TRAIN, ITEM_MFU, ITEM_GEN = "1. training throughput", "1. MFU", "5. generation"
IMAGE_SPEC = ImageSpec(1, 28, 28)                                     # MNIST-5k
TEXT_SPEC = TextSpec(vocab_size=2893, max_len=34, pad_id=0, bos_id=1, eos_id=2)  # Lee news, max_tokens 32
NUM_TRAIN = {"image": 3500, "text": 1737}                            # default train split sizes


def synthetic_data(modality: str, seed: int = 0) -> torch.Tensor:
    """Training tensor with the default data's shape: uint8 images or bos/tokens/eos/pad rows."""
    g = torch.Generator().manual_seed(seed)
    n = NUM_TRAIN[modality]
    if modality == "image":
        return torch.randint(0, 256, (n, IMAGE_SPEC.channels, IMAGE_SPEC.height, IMAGE_SPEC.width),
                             generator=g, dtype=torch.uint8)
    spec = TEXT_SPEC
    rows = torch.full((n, spec.max_len), spec.pad_id, dtype=torch.long)
    lengths = torch.randint(3, spec.max_len - 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        rows[i, 0] = spec.bos_id
        rows[i, 1:length] = torch.randint(3, spec.vocab_size, (length - 1,), generator=g)
        rows[i, length] = spec.eos_id
    return rows


# --- the plain loops: the family's modules and loss math, a plain optimizer step -------------
def _plain_vae(model) -> Callable[[torch.Tensor], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def step(batch: torch.Tensor) -> None:
        mu, logvar = model.encoder(batch.float() / 127.5 - 1.0).chunk(2, dim=1)
        logvar = logvar.clamp(-12.0, 8.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        out, log_scale = model.decoder_conv(model.decoder_fc(z).view(-1, *model.feature_shape)).chunk(2, dim=1)
        recon = -discretized_logistic_log_prob(batch.float(), 127.5 + 127.5 * out, log_scale.clamp(-4.0, 5.0))
        loss = (recon.flatten(1).sum(1) + kl_to_standard_normal(mu, logvar)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _plain_dcgan(model) -> Callable[[torch.Tensor], None]:
    d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(model.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits

    def step(batch: torch.Tensor) -> None:
        real = images_to_unit(batch)
        fake = model.generator(torch.randn(batch.shape[0], model.config.latent_dim))
        real_logits, fake_logits = model.discriminator(real), model.discriminator(fake.detach())
        d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        logits = model.discriminator(fake)
        g_loss = bce(logits, torch.ones_like(logits))
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
    return step


def _plain_transformer_lm(model) -> Callable[[torch.Tensor], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    pad = model.spec.pad_id

    def step(batch: torch.Tensor) -> None:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], ignore_index=pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def _plain_density(grad_clip: float | None) -> Callable:
    """Likelihood families trained on one loss (pixelcnn, realnvp, ddpm, gmm): their loss math, one AdamW."""
    def make(model) -> Callable[[torch.Tensor], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

        def step(batch: torch.Tensor) -> None:
            if hasattr(model, "initialized") and not model.initialized:  # gmm: data-dependent start
                model.initialize_from(batch)
            loss = model.loss(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        return step
    return make


def _plain_wgan_gp(model) -> Callable[[torch.Tensor], None]:
    critic_opt = torch.optim.Adam(model.critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    gen_opt = torch.optim.Adam(model.generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    latent, n_critic, weight, count = model.config.latent_dim, model.config.n_critic, \
        model.config.gradient_penalty_weight, [0]

    def step(batch: torch.Tensor) -> None:
        real = images_to_unit(batch)
        with torch.no_grad():
            fake = model.generator(torch.randn(batch.shape[0], latent))
        mix = torch.rand(real.shape[0], 1, 1, 1)
        critic_loss = model.critic(fake).mean() - model.critic(real).mean() \
            + weight * gradient_penalty(model.critic, real, fake, mix)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()
        if count[0] % n_critic == 0:
            gen_loss = -model.critic(model.generator(torch.randn(batch.shape[0], latent))).mean()
            gen_opt.zero_grad(set_to_none=True)
            gen_loss.backward()
            gen_opt.step()
        count[0] += 1
    return step


# A family missing here is reported as skipped: write its plain loop to benchmark it.
PLAIN_LOOPS = {
    "vae": _plain_vae, "dcgan": _plain_dcgan, "transformer_lm": _plain_transformer_lm,
    "pixelcnn": _plain_density(None), "realnvp": _plain_density(100.0), "ddpm": _plain_density(None),
    "gmm": _plain_density(None), "wgan_gp": _plain_wgan_gp,
}


class PlainLoop:
    """A minimal loop: one seeded permutation per epoch, slice, step."""

    def __init__(self, model, train: torch.Tensor, batch_size: int) -> None:
        self.step_fn, self.train, self.batch_size = PLAIN_LOOPS[model_name(model)](model), train, batch_size
        self.order, self.position = torch.randperm(train.shape[0]), 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.position + self.batch_size > self.train.shape[0]:
                self.order, self.position = torch.randperm(self.train.shape[0]), 0
            self.step_fn(self.train[self.order[self.position:self.position + self.batch_size]])
            self.position += self.batch_size


def model_name(model) -> str:
    return next(name for name, fam in REGISTRY.items() if type(model) is fam.model_class)


def make_trainer(family: str, model, train: torch.Tensor, config) -> Trainer:
    """The real ``Trainer`` around an in-memory model and data (no prepared data, no state files).

    Built with ``__new__`` because ``Trainer.__init__`` reads the prepared data from disk; the
    attributes are the ones ``Trainer.fit`` uses. Validation and checkpoints are switched off.
    """
    train_config = config.families[family].train
    trainer = Trainer.__new__(Trainer)
    trainer.family, trainer.config, trainer.device = family, config, torch.device("cpu")
    trainer.train_config = SimpleNamespace(steps=0, batch_size=train_config.batch_size, log_every=10**9,
                                           eval_every=None, checkpoint_every=10**9, keep_best=False)
    trainer.data = TrainingData(train, train[:1], model.spec, "synthetic")
    trainer.model = model
    trainer.settings = _settings(train_config)
    trainer.optimizers = model.configure_optimizers(trainer.settings)
    from genai_models.base import Precision
    trainer.precision = Precision(trainer.device, config.mixed_precision)
    trainer.step, trainer.curve, trainer.train_seconds, trainer.best = 0, [], 0.0, None
    # The family's per-step additions (LR schedule, EMA of the weights) as the real run has them.
    trainer.schedulers = lr_schedulers(trainer.optimizers, train_config.lr_schedule, train_config.warmup_steps,
                                       train_config.steps)
    trainer.ema = ModelEMA(model, train_config.ema_decay) if train_config.ema_decay else None
    return trainer


def run_trainer(trainer: Trainer, steps: int) -> None:
    trainer.train_config.steps = trainer.step + steps
    trainer.fit()


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> tuple[list[float], str]:
    """Measured fp32 matmul FLOP/s (torch.matmul of two size x size matrices), per repeat."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: [torch.matmul(a, b) for _ in range(4)])
        rates.append(4 * 2 * size**3 / seconds)
    return rates, f"torch.matmul fp32 {size}x{size} @ {size}x{size}, 4 calls per repeat, 2n^3 FLOPs each"


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of every dispatched op with torch's own formulas (``flop_registry``).

    The same numbers as ``torch.utils.flop_counter.FlopCounterMode``, without its module
    tracking, whose backward hooks break ``torch.autograd.grad`` (WGAN-GP's gradient penalty).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            shape = lambda x: x.shape if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.total += formula(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
        return out


def step_flops(trainer: Trainer, batch_size: int) -> int:
    """FLOPs of one training step (forward + backward), counted on a copy of the model."""
    model = copy.deepcopy(trainer.model)
    optimizers = model.configure_optimizers(trainer.settings)
    batch = trainer.data.train[:batch_size]
    with FlopCounter() as counter:
        model.training_step(batch, optimizers, trainer.precision, trainer.settings)
    return counter.total


def training_figures(quick: bool, peak_flops: float, peak_how: str) -> list[Figure]:
    """Item 1 for every registered family: samples/s of ours and plain, their ratio, MFU."""
    config = load_params("params.yaml")
    steps, repeats = (5, 9) if quick else (10, 21)
    figures = []
    for family_name, family in REGISTRY.items():
        if family_name not in PLAIN_LOOPS or family_name not in config.families:
            why = "no plain loop written in benchmarks/training.py" if family_name not in PLAIN_LOOPS else \
                "not in params.yaml"
            figures.append(Figure(ITEM_TRAIN, f"{family_name}: ours / plain", "x", None, status="skipped",
                                  how=f"skipped: {why}"))
            continue
        torch.manual_seed(0)
        spec = IMAGE_SPEC if family.modality == "image" else TEXT_SPEC
        model = family.build(config.family_model_config(family_name), spec).train()
        plain_model = copy.deepcopy(model)
        train = synthetic_data(family.modality)
        batch_size = config.families[family_name].train.batch_size
        trainer, plain = make_trainer(family_name, model, train, config), PlainLoop(plain_model, train, batch_size)
        run_trainer(trainer, 3)  # warm-up: allocator, first-call dispatch
        plain.run(3)
        ours_s, plain_s = [], []
        for _ in range(repeats):  # interleaved: ours, plain, ours, plain, ...
            ours_s.append(timed(lambda: run_trainer(trainer, steps))[0])
            plain_s.append(timed(lambda: plain.run(steps))[0])
        ours_rate = [steps * batch_size / s for s in ours_s]
        plain_rate = [steps * batch_size / s for s in plain_s]
        ratios = [p / o for o, p in zip(ours_s, plain_s)]
        setup = (f"batch {batch_size}, {steps} steps per repeat after 3 warm-up steps, synthetic data shaped "
                 f"like the default {family.modality} data, fp32 CPU, {torch.get_num_threads()} threads")
        figures.append(Figure.from_values(ITEM_TRAIN, f"{family_name}: ours", "samples/s", ours_rate,
                                          f"Trainer.fit (real loop); {setup}"))
        figures.append(Figure.from_values(ITEM_TRAIN, f"{family_name}: plain", "samples/s", plain_rate,
                                          f"plain PyTorch loop, same modules/loss/optimizer; {setup}"))
        figures.append(Figure.from_values(
            ITEM_TRAIN, f"{family_name}: ours / plain", "x", ratios,
            f"ratio of the interleaved timings of each repeat (plain time / ours time); {setup}",
            target=lambda r: r >= 0.95, target_text=">= 0.95"))
        flops = step_flops(trainer, batch_size)
        mfu = [flops * steps / s / peak_flops * 100 for s in ours_s]
        figures.append(Figure.from_values(
            ITEM_MFU, f"{family_name}: ours MFU", "% of peak", mfu,
            f"{flops / 1e9:.3f} GFLOP per step (torch's flop formulas, forward+backward of one training_step) x "
            f"steps/s of ours / measured peak {peak_flops / 1e9:.1f} GFLOP/s ({peak_how}); plain MFU = "
            f"{statistics.median(flops * steps / s / peak_flops * 100 for s in plain_s):.2f}%"))
    return figures


def generation_figures(quick: bool) -> list[Figure]:
    """Item 5: model.sample samples/s per family, default config, untrained weights."""
    config = load_params("params.yaml")
    repeats = 3 if quick else 7
    figures = []
    for family_name, family in REGISTRY.items():
        if family_name not in config.families:
            figures.append(Figure(ITEM_GEN, family_name, "samples/s", None, status="skipped",
                                  how="skipped: no params.yaml block"))
            continue
        torch.manual_seed(0)
        spec = IMAGE_SPEC if family.modality == "image" else TEXT_SPEC
        model = family.build(config.family_model_config(family_name), spec).eval()
        count = 250 if family.modality == "image" else 100
        generator = torch.Generator().manual_seed(0)
        model.sample(min(count, 8), generator)  # warm-up
        rates = []
        for _ in range(repeats):
            seconds, samples = timed(lambda: model.sample(count, generator))
            rates.append(count / seconds)
        note = ("; untrained weights rarely emit eos, so sentences run to max_len 34: a worst case"
                if family.modality == "text" else "")
        figures.append(Figure.from_values(
            ITEM_GEN, family_name, "samples/s", rates,
            f"model.sample({count}, torch.Generator) at the params.yaml config, untrained weights, fp32 CPU, "
            f"{torch.get_num_threads()} threads{note}"))
    return figures
