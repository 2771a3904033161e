"""Learning-rate schedules: a linear warm-up, then constant, cosine or linear decay to zero.

Warm-up: Goyal et al., "Accurate, Large Minibatch SGD", 2017 (arXiv:1706.02677); Ho et al.
(DDPM, NeurIPS 2020) warm up over 5,000 steps. Cosine decay: Loshchilov & Hutter, "SGDR",
ICLR 2017 (arXiv:1608.03983), without restarts. Linear decay to zero: the GAN practice of
e.g. Zhu et al. (CycleGAN) and Miyato et al. (SN-GAN, ICLR 2018).

The factor is a pure function of the step, so a resumed run continues exactly where it
stopped; the schedulers are ``torch.optim.lr_scheduler.LambdaLR`` (one per optimizer, each
param group keeps its own base learning rate), stepped once per training step. Stepping only
writes Python floats into the optimizers' param groups: nothing is read back from a device.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Schedule = Literal["constant", "cosine", "linear"]
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")


def lr_factor(step: int, schedule: Schedule, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` of ``total_steps``.

    Warm-up: (step + 1) / warmup_steps for the first ``warmup_steps`` steps. Then ``constant``
    stays at 1; ``cosine`` follows 0.5 (1 + cos(pi p)) and ``linear`` 1 - p, with p the share
    of the post-warm-up steps already done, so both reach 0 after the last step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def lr_schedulers(optimizers: list[torch.optim.Optimizer], schedule: Schedule, warmup_steps: int,
                  total_steps: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per optimizer following ``lr_factor``; none when nothing changes the rate."""
    if schedule == "constant" and warmup_steps == 0:
        return []
    factor = functools.partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]
