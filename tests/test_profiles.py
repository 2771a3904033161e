"""The full-size profiles (profiles/*.yaml): valid, in step with params.yaml, and every family builds
and takes a training step at its full size on the profile's image shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from genai_models.base import ImageSpec, Precision, TextSpec
from genai_models.registry import REGISTRY
from tasks.config import load_params
from tasks.train import _settings
from tests.conftest import REPO_ROOT

PROFILES = {"full-mnist.yaml": ImageSpec(1, 28, 28), "full-cifar10.yaml": ImageSpec(3, 32, 32)}
LEE_NEWS = TextSpec(vocab_size=2893, max_len=34, pad_id=0, bos_id=1, eos_id=2)


def key_tree(value) -> object:
    return {k: key_tree(v) for k, v in value.items()} if isinstance(value, dict) else None


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profile_is_a_valid_params_file_with_the_keys_of_params_yaml(name):
    path = REPO_ROOT / "profiles" / name
    config = load_params(path)
    assert config.data.images.dataset == {"full-mnist.yaml": "mnist", "full-cifar10.yaml": "cifar10"}[name]
    assert key_tree(yaml.safe_load(path.read_text())) == key_tree(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))


def full_size_models(name: str):
    config = load_params(Path(REPO_ROOT / "profiles" / name))
    for family_name, family in REGISTRY.items():
        torch.manual_seed(0)
        spec = PROFILES[name] if family.modality == "image" else LEE_NEWS
        yield config, family_name, family.build(config.family_model_config(family_name), spec), spec


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_family_builds_at_the_profiles_full_size_and_image_shape(name):
    built = {family_name: model for _, family_name, model, _ in full_size_models(name)}
    assert set(built) == set(REGISTRY)
    assert sum(p.numel() for p in built["pixelcnn"].parameters()) > 1_000_000  # the full-size network, not the default


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_family_trains_a_step_at_the_profiles_full_size(name):
    for config, family_name, model, spec in full_size_models(name):
        family = REGISTRY[family_name]
        settings = _settings(config.families[family_name].train)
        if family.modality == "image":
            batch = torch.randint(0, 256, (2, spec.channels, spec.height, spec.width), dtype=torch.uint8)
        else:
            batch = torch.randint(3, spec.vocab_size, (2, spec.max_len))
            batch[:, 0], batch[:, -1] = spec.bos_id, spec.eos_id
        terms = model.training_step(batch, model.configure_optimizers(settings),
                                    Precision(torch.device("cpu"), False), settings)
        assert torch.isfinite(terms["loss"]), family_name
