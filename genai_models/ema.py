"""Exponential moving average (EMA) of a model's weights, the copy that is sampled and saved.

Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control
Optim. 30(4), 1992; as used for generative models: Karras et al., "Progressive Growing of
GANs", ICLR 2018 (generator EMA 0.999); Yazıcı et al., "The Unusual Effectiveness of
Averaging in GAN Training", ICLR 2019 (arXiv:1806.04498); Ho et al., "Denoising Diffusion
Probabilistic Models", NeurIPS 2020 (EMA 0.9999).

After every optimisation step, ``ema <- d * ema + (1 - d) * weights`` for every floating-point
entry of the model's ``state_dict`` (parameters and float buffers, e.g. batch-norm running
statistics, as timm's ``ModelEmaV2`` does); other entries (step counters, flags) are copied.
The decay warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=n)``,
``d_n = min(decay, (1 + n) / (10 + n))``, so that a short run is not dominated by its random
initialisation: the average covers roughly the last tenth of the steps done so far until it
reaches the horizon 1 / (1 - decay).

The update is one fused ``torch._foreach_lerp_`` on the weights' own device with a Python
float, so it never reads a value back to the host.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ModelEMA:
    """The running average of ``model``'s state; ``update`` after each step, ``swapped_in`` to use it."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        state = model.state_dict()
        self.names = list(state)
        self.averaged = {name: value.detach().clone() for name, value in state.items()}
        self._float = [name for name in self.names if state[name].is_floating_point()]
        self._other = [name for name in self.names if not state[name].is_floating_point()]

    def current_decay(self) -> float:
        """The decay the next ``update`` uses: min(decay, (1 + n) / (10 + n)) after n updates."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d * ema + (1 - d) * model for float entries; the others are copied. No host sync."""
        weight = 1.0 - self.current_decay()
        state = model.state_dict()
        torch._foreach_lerp_([self.averaged[n] for n in self._float], [state[n].detach() for n in self._float],
                             weight)
        for name in self._other:
            self.averaged[name].copy_(state[name])
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the averaged weights; its own come back afterwards."""
        live = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.averaged)
        try:
            yield
        finally:
            model.load_state_dict(live)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` for good (end of training)."""
        model.load_state_dict(self.averaged)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "averaged": self.averaged}

    def load_state_dict(self, state: dict) -> None:
        if set(state["averaged"]) != set(self.names):
            raise ValueError("the saved EMA state does not match the model's state_dict keys")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for name, value in state["averaged"].items():
            self.averaged[name].copy_(value)
