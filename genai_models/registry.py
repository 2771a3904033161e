"""The only place where family names map to their config and model classes.

Adding a family: write ``genai_models/<name>.py`` with a config dataclass and a
``GenerativeModel`` subclass, add one ``register`` line below, a ``families.<name>``
block in ``params.yaml``, and the two foreach entries in ``dvc.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genai_models.base import DataSpec, GenerativeModel, Modality


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_class: type[GenerativeModel]

    @property
    def modality(self) -> Modality:
        return self.model_class.modality

    def build(self, config: Any, spec: DataSpec) -> GenerativeModel:
        return self.model_class(config, spec)


REGISTRY: dict[str, Family] = {}


def register(name: str, config_class: type, model_class: type[GenerativeModel]) -> None:
    """Add a family; a name may be registered once."""
    if name in REGISTRY:
        raise ValueError(f"family {name!r} is already registered")
    REGISTRY[name] = Family(name, config_class, model_class)


def get_family(name: str) -> Family:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known families: {', '.join(sorted(REGISTRY))}") from None


# Registration order is the order of the report's tables.
from genai_models import (  # noqa: E402
    ae_gmm, dcgan, ddpm, gmm, hmm, pixelcnn, rbm, realnvp, transformer_lm, vae, wgan_gp,
)

register("vae", vae.VAEConfig, vae.VAE)
register("dcgan", dcgan.DCGANConfig, dcgan.DCGAN)
register("transformer_lm", transformer_lm.TransformerLMConfig, transformer_lm.TransformerLM)
register("pixelcnn", pixelcnn.PixelCNNConfig, pixelcnn.PixelCNN)
register("realnvp", realnvp.RealNVPConfig, realnvp.RealNVP)
register("ddpm", ddpm.DDPMConfig, ddpm.DDPM)
register("wgan_gp", wgan_gp.WGANGPConfig, wgan_gp.WGANGP)
register("gmm", gmm.GMMConfig, gmm.GMM)
register("rbm", rbm.RBMConfig, rbm.RBM)
register("hmm", hmm.HMMConfig, hmm.HMM)
register("ae_gmm", ae_gmm.AEGMMConfig, ae_gmm.AEGMM)
