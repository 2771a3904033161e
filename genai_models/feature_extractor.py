"""Feature extractors for Fréchet distances (FID) between image sets.

- ``DigitClassifier``: a small CNN trained on the real training split; its penultimate
  layer is the feature space (the usual choice for MNIST-like data on a CPU, cf. the
  "FID with a domain classifier" practice of e.g. Lucic et al., NeurIPS 2018).
- ``InceptionFeatures``: torchvision's InceptionV3 (ImageNet weights, loaded from a
  local file) pool features, 2048-d, as in Heusel et al., "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017. These are
  torchvision's weights, not the TF-Inception graph of the original FID code, so values
  are close to but not identical with published TF-FID numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import ImageSpec


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


class InceptionFeatures(nn.Module):
    """InceptionV3 pool3 features (B, 2048) of uint8 images, resized to 299x299."""

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torchvision.models import inception_v3  # torchvision only when this extractor is used

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"InceptionV3 weights not found: {path}")
        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.fc = nn.Identity()
        self.net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: torch.Tensor, batch_size: int = 500, device: torch.device | None = None
) -> torch.Tensor:
    """Features of uint8 images (N, C, H, W) in batches -> (N, D) float64 on the CPU.

    The batches' features stay on the device until all are done: one copy back, no wait per batch.
    """
    extractor.eval()
    device = device or next(extractor.parameters()).device
    chunks = [extractor.features(images[i:i + batch_size].to(device, non_blocking=True)).double()
              for i in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks).cpu()
