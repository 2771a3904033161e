"""Feature networks the sample metrics (FID, KID, precision/recall, IS, ...) are measured in.

- ``DigitClassifier``: a small CNN trained on the real training split; its penultimate layer is
  the feature space and its softmax the class probabilities of the Inception-style score (the
  usual choice for MNIST-like data on a CPU, cf. the "FID with a domain classifier" practice of
  e.g. Lucic et al., NeurIPS 2018). Its numbers compare only within this pipeline's runs.
- ``FIDInception``: the TF-compatible InceptionV3 of the original FID and IS code (Heusel et al.
  2017; Salimans et al. 2016), as torch-fidelity implements it: TF-style bilinear resizing to
  299x299, 2048-d pool features, and the 1008-way "unbiased" logits for the Inception score. With
  the standard weights file (``weights-inception-2015-12-05-6726825d.pth``, the same weights as
  pytorch-fid's ``pt_inception-2015-12-05``) its FID and IS are the ones published tables use.

Both answer ``embed(uint8 images (B, C, H, W)) -> (features (B, D), class probabilities (B, K))``.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from genai_models.base import ImageSpec

# torch-fidelity's release of the FID Inception weights; the hash prefix in the name is the start of
# the file's sha256 (the torch.hub convention), checked on download.
FID_INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")
FID_INCEPTION_SHA256_PREFIX = "6726825d"


@dataclass
class ClassifierSpec:
    num_classes: int
    feature_dim: int = 128


class DigitClassifier(nn.Module):
    """Two conv blocks + a feature layer + a linear head. uint8 (B, C, H, W) in."""

    def __init__(self, image: ImageSpec, spec: ClassifierSpec) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(image.channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image.height // 4) * (image.width // 4), spec.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> (B, feature_dim) float features."""
        return self.body(images.float() / 127.5 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> class logits (B, num_classes)."""
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) -> features (B, feature_dim) and class probabilities (B, num_classes)."""
        features = self.features(images)
        return features, self.head(features).softmax(dim=1)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` inside weights-only, even one that asks for full unpickling."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class FIDInception(nn.Module):
    """The FID InceptionV3 (torch-fidelity's TF-compatible port) built from weights already in memory.

    ``weights`` are the bytes of the state-dict file, verified by the caller (tasks.features);
    they are unpickled weights-only (torch-fidelity's own loader would unpickle them in full).
    """

    def __init__(self, weights: bytes) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        with _weights_only_loads():
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=io.BytesIO(weights))
        self.net.eval()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W), C = 1 or 3 -> pool features (B, 2048) and class probabilities (B, 1008)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features, logits = self.net(images.contiguous())
        return features.float(), logits.float().softmax(dim=1)


@torch.no_grad()
def embed_images(extractor: nn.Module, images: torch.Tensor, batch_size: int = 500,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and class probabilities (N, K) of uint8 images (N, C, H, W), float64 on the CPU."""
    extractor.eval()
    device = device or next(extractor.parameters()).device
    features, probs = [], []
    for i in range(0, images.shape[0], batch_size):
        f, p = extractor.embed(images[i:i + batch_size].to(device))
        features.append(f.double().cpu())
        probs.append(p.double().cpu())
    return torch.cat(features), torch.cat(probs)


def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 500,
                     device: torch.device | None = None) -> torch.Tensor:
    """Features of uint8 images (N, C, H, W) in batches -> (N, D) float64 on the CPU."""
    return embed_images(extractor, images, batch_size, device)[0]
