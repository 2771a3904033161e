"""Sample quality while a family trains: a cheap FID, precision and recall every ``eval_every`` steps.

The training step records them in ``loss.csv`` beside the losses, with the training seconds so far,
so ``dvc plots show`` and the report can draw quality against compute. They are measured on
``evaluate.curve_samples`` plain samples against the test features of the ``features`` step:
fewer samples than the final evaluation, so FID sits higher and recall lower than in the final
table; the curve compares steps and families, not with that table.
"""

from __future__ import annotations

import torch

from genai_models.base import GenerativeModel
from genai_models.feature_extractor import embed_images
from genai_models.metrics import features_to_stats
from genai_models.metrics.sample_quality import (
    frechet_distance_from_sqrt, knn_radii, manifold_metrics, pairwise_distances,
)
from tasks.config import PipelineConfig
from tasks.feature_space import load_extractor, load_real_reference
from tasks.samples import draw_samples


class QualityCurve:
    """Loads the feature network and the real reference once; ``measure`` scores a model's samples."""

    def __init__(self, config: PipelineConfig, device: torch.device) -> None:
        self.device = device
        self.count, self.seed = config.evaluate.curve_samples, config.sample_seed
        self.batch_size, self.k = config.evaluate.batch_size, config.evaluate.k_nearest
        self.extractor = load_extractor(config, device)
        self.reference = load_real_reference(config)

    @torch.no_grad()
    def measure(self, model: GenerativeModel) -> dict[str, float]:
        """FID, precision and recall of ``curve_samples`` plain samples; the training random stream is untouched."""
        was_training = model.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            samples = draw_samples(model.plain_sampling() or model, self.count, self.batch_size, self.seed)
            model.train(was_training)
        features = embed_images(self.extractor, samples, device=self.device)[0].numpy()
        ref = self.reference
        mu, sigma = features_to_stats(features)
        metrics = manifold_metrics(pairwise_distances(ref.test, features), ref.radii,
                                   knn_radii(pairwise_distances(features, features), self.k), self.k)
        return {"fid": frechet_distance_from_sqrt(ref.fid_mu, ref.fid_sigma, ref.sqrt_sigma, mu, sigma),
                "precision": metrics["precision"], "recall": metrics["recall"]}
