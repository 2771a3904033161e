"""Shared fixtures: tiny per-family configs and synthetic batches of the right shape.

Adding a family means adding its tiny config to ``TINY_CONFIGS``; the contract suite
then covers it (``test_every_family_has_a_tiny_config`` fails until it is there).
"""

from __future__ import annotations

from pathlib import Path

import dvc  # noqa: F401  (before any test: its import binds its log handlers to the sys.stdout/stderr of that
#              moment, and a test's capsys streams are closed after the test; later DVC logs would then fail)
import pytest
import torch

from genai_models.base import ImageSpec, TextSpec
from genai_models.registry import REGISTRY

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

TINY_CONFIGS: dict[str, dict] = {
    "vae": {"latent_dim": 4, "base_channels": 4, "hidden_dim": 16},
    "dcgan": {"latent_dim": 8, "base_channels": 8},
    "transformer_lm": {"d_model": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
    "pixelcnn": {"hidden_channels": 8, "num_layers": 3},
    "realnvp": {"hidden_channels": 32, "final_couplings": 2},
    "ddpm": {"base_channels": 8, "num_train_timesteps": 100, "sample_steps": 5, "bound_samples": 1,
             "beta_schedule": "cosine", "attention": True},
    "wgan_gp": {"latent_dim": 8, "base_channels": 8, "n_critic": 2},
    "gmm": {"num_components": 4, "latent_dim": 4},
    "rbm": {"num_hidden": 16, "cd_steps": 10, "num_chains": 16, "gibbs_steps": 20, "ais_runs": 16, "ais_betas": 200},
    "hmm": {"num_states": 32},
    "ae_gmm": {"latent_dim": 4, "base_channels": 4, "hidden_dim": 16, "mixture_components": 2},
}
# Steps of the overfit-one-batch test where 300 are too few: PCD follows the likelihood gradient only
# through its persistent chains, which need a small learning rate to keep up (44 -> 17.5 nats in 1,000).
OVERFIT_STEPS: dict[str, int] = {"rbm": 1000}
TINY_IMAGE = ImageSpec(channels=1, height=8, width=8)
TINY_RGB = ImageSpec(channels=3, height=4, width=4)  # colour: the contract suite runs image families on both
TINY_TEXT = TextSpec(vocab_size=20, max_len=10, pad_id=0, bos_id=1, eos_id=2)


def tiny_model(name: str, seed: int = 0, image: ImageSpec = TINY_IMAGE):
    family = REGISTRY[name]
    torch.manual_seed(seed)
    spec = image if family.modality == "image" else TINY_TEXT
    return family.build(family.config_class(**TINY_CONFIGS[name]), spec)


def tiny_batch(modality: str, batch_size: int = 8, seed: int = 0, image: ImageSpec = TINY_IMAGE) -> torch.Tensor:
    """A fixed batch: blocky uint8 images of ``image``'s shape, or bos/tokens/eos/pad sequences of varied length."""
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        c, h, w = image.channels, image.height, image.width
        coarse = torch.randint(0, 256, (batch_size, c, h // 2, w // 2), generator=g, dtype=torch.uint8)
        return coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    batch = torch.full((batch_size, TINY_TEXT.max_len), TINY_TEXT.pad_id, dtype=torch.long)
    for row in range(batch_size):
        length = int(torch.randint(2, TINY_TEXT.max_len - 1, (1,), generator=g))
        batch[row, 0] = TINY_TEXT.bos_id
        batch[row, 1:length] = torch.randint(3, TINY_TEXT.vocab_size, (length - 1,), generator=g)
        batch[row, length] = TINY_TEXT.eos_id
    return batch


@pytest.fixture(params=sorted(REGISTRY))
def family_name(request) -> str:
    return request.param


def _family_cases() -> list:
    cases = []
    for name in sorted(REGISTRY):
        cases.append(pytest.param((name, TINY_IMAGE), id=name))
        if REGISTRY[name].modality == "image":
            cases.append(pytest.param((name, TINY_RGB), id=f"{name}-rgb"))
    return cases


@pytest.fixture(params=_family_cases())
def family_case(request) -> tuple[str, ImageSpec]:
    """(family, image spec): every family on grey 1x8x8 images, and every image family on RGB 3x4x4 (cheap)."""
    return request.param


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test when that folder is absent (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path
