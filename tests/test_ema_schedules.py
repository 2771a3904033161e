"""The training loop's EMA of the weights and learning-rate schedules: their math, and that
the loop uses them (what is validated and saved is the EMA; the rate follows the schedule)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genai_models.ema import ModelEMA
from genai_models.schedules import lr_factor, lr_schedulers


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, "constant", 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(99, "constant", 4, 100) == 1.0
    # cosine and linear: 1 right after the warm-up, half way at the middle of the rest, 0 at the end
    assert lr_factor(4, "cosine", 4, 104) == 1.0 and lr_factor(4, "linear", 4, 104) == 1.0
    assert lr_factor(54, "cosine", 4, 104) == pytest.approx(0.5)
    assert lr_factor(54, "linear", 4, 104) == pytest.approx(0.5)
    assert lr_factor(29, "cosine", 4, 104) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(104, "cosine", 4, 104) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(0, "step", 0, 10)


def test_schedulers_set_every_param_group_from_its_own_base_rate():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    (scheduler,) = lr_schedulers([optimizer], "cosine", warmup_steps=2, total_steps=10)
    seen = []
    for step in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, rates in enumerate(seen):
        factor = lr_factor(step, "cosine", 2, 10)
        assert rates == pytest.approx([0.1 * factor, 1.0 * factor])
    assert lr_schedulers([optimizer], "constant", 0, 10) == []  # nothing to do: no scheduler at all


def test_ema_is_the_warmed_up_exponential_average_of_the_weights():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    values = [1.0, 3.0, 7.0]
    expected = model[0].weight.detach().clone()
    for n, value in enumerate(values):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked.fill_(n + 10)
        d = min(0.5, (1 + n) / (10 + n))   # 0.1, 0.1818..., 0.25: the warm-up, below the decay
        expected = d * expected + (1 - d) * value
        ema.update(model)
    assert torch.allclose(ema.averaged["0.weight"], expected)
    assert ema.averaged["1.num_batches_tracked"] == 12  # integer buffers are copied, not averaged
    assert ema.current_decay() == pytest.approx(min(0.5, 4 / 13))


def test_swapped_in_gives_the_average_and_restores_the_live_weights():
    model = nn.Linear(3, 1)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    with torch.no_grad():
        model.weight.add_(5.0)
    live = model.weight.detach().clone()
    with ema.swapped_in(model):
        assert torch.equal(model.weight, ema.averaged["weight"])
        assert not torch.equal(model.weight, live)
    assert torch.equal(model.weight, live)
    restored = ModelEMA(nn.Linear(3, 1), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.averaged["weight"], ema.averaged["weight"])
    with pytest.raises(ValueError, match="decay must be in"):
        ModelEMA(model, decay=1.0)
