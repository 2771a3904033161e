"""Speed settings that must not change what is trained: channels_last and torch.compile."""

from __future__ import annotations

import pytest
import torch

from tasks.config import parse_params
from tasks.train import Trainer, channels_last_on
from tests.test_train import tiny_params, workspace  # noqa: F401  (the fixture: prepared tiny data)


def _trained(performance: dict, family: str = "vae", steps: int = 4) -> Trainer:
    params = tiny_params(steps=steps)
    params["performance"] = performance
    trainer = Trainer(parse_params(params), family)
    trainer.fit()
    return trainer


def test_channels_last_is_automatic_only_for_image_families_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last_on("auto", cuda, "image") and not channels_last_on("auto", cuda, "text")
    assert not channels_last_on("auto", cpu, "image")
    assert channels_last_on(True, cpu, "image") and not channels_last_on(False, cuda, "image")


def test_channels_last_trains_the_same_model(workspace):  # noqa: F811
    plain, nhwc = _trained({"channels_last": False}), _trained({"channels_last": True})
    conv = nhwc.model.encoder[2].weight  # (2ch, ch, 4, 4): the first conv has one input channel
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(plain.curve, nhwc.curve):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_networks_train_the_same_model(workspace):  # noqa: F811
    eager, compiled = _trained({"compile": "off"}), _trained({"compile": "default"})
    assert hasattr(compiled.model.encoder, "_compiled_call_impl") and compiled.model.encoder._compiled_call_impl
    for a, b in zip(eager.curve, compiled.curve):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
