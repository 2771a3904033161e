"""Feature-extractor step: the network FID is measured in, and the real-data reference.

With ``features.extractor: classifier`` (the CPU default) a small CNN is trained on the
real training split; its test accuracy is reported beside every FID. With
``inception`` the torchvision InceptionV3 weights are loaded from a local file.
This step also stores the test split's feature statistics and the FID floor (real
training images vs real test images, at the sample count the families are scored with).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from genai_models.feature_extractor import ClassifierSpec, DigitClassifier, InceptionFeatures, extract_features
from genai_models.metrics import features_to_stats, frechet_distance
from tasks import data, paths
from tasks.checkpoints import load_torch, save_torch
from tasks.config import PipelineConfig
from tasks.datasets import DataError
from tasks.io import atomic_write_json, replace_directory
from tasks.runtime import StepClock, device_name, resolve_device, seed_everything
from tasks.train import batch_indices

log = logging.getLogger(__name__)


def train_classifier(config: PipelineConfig, device: torch.device) -> tuple[DigitClassifier, float]:
    """Fit the classifier on the real training split; returns it and its test accuracy."""
    cfg = config.features.classifier
    train_x, train_y = (torch.from_numpy(a) for a in data.load_images(paths.IMAGE_DATA, "train"))
    test_x, test_y = (torch.from_numpy(a) for a in data.load_images(paths.IMAGE_DATA, "test"))
    seed_everything(config.seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    model = DigitClassifier(data.image_spec(paths.IMAGE_DATA), ClassifierSpec(num_classes, cfg.feature_dim)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    binarized = data.is_dynamically_binarized(paths.IMAGE_DATA)  # then it sees images like the test split's
    model.train()
    for step in range(cfg.steps):
        index = batch_indices(step, train_x.shape[0], cfg.batch_size, config.seed)
        batch = train_x[index]
        if binarized:
            batch = data.binarize(batch, torch.Generator().manual_seed(config.seed * 1_000_003 + step))
        loss = F.cross_entropy(model(batch.to(device)), train_y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log.info("feature classifier step %d/%d  loss %.4f", step + 1, cfg.steps, loss.item())
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(test_x[i:i + 1000].to(device)).argmax(1).cpu()
                                 for i in range(0, test_x.shape[0], 1000)])
    return model, float((predictions == test_y).float().mean())


def load_extractor(config: PipelineConfig, device: torch.device) -> nn.Module:
    """The feature extractor this pipeline's FIDs are measured with."""
    if config.features.extractor == "inception":
        return InceptionFeatures(config.features.inception_weights).to(device)
    checkpoint = load_torch(paths.FEATURE_EXTRACTOR / "classifier.pt")
    model = DigitClassifier(data.image_spec(paths.IMAGE_DATA), ClassifierSpec(**checkpoint["classifier_spec"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def extractor_description(config: PipelineConfig) -> str:
    if config.features.extractor == "inception":
        return "torchvision InceptionV3 (IMAGENET1K_V1) pool features, 2048-d"
    return f"DigitClassifier penultimate layer, {config.features.classifier.feature_dim}-d, trained on the train split"


def load_reference_stats() -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the test split's features."""
    return np.load(paths.FEATURE_EXTRACTOR / "test_mu.npy"), np.load(paths.FEATURE_EXTRACTOR / "test_sigma.npy")


def build_feature_extractor(config: PipelineConfig) -> Path:
    """Write ``models/feature_extractor/``: the extractor, test statistics, the FID floor."""
    clock = StepClock("features")
    check_feature_space(config)
    device = resolve_device(config.device)
    out = paths.FEATURE_EXTRACTOR
    summary: dict = {"extractor": config.features.extractor, "description": extractor_description(config),
                     "device": device_name(device)}
    with replace_directory(out) as tmp:
        if config.features.extractor == "classifier":
            classifier, accuracy = train_classifier(config, device)
            save_torch({"classifier_spec": {"num_classes": classifier.head.out_features,
                                            "feature_dim": classifier.head.in_features},
                        "state_dict": {k: v.cpu() for k, v in classifier.state_dict().items()}},
                       tmp / "classifier.pt")
            extractor: nn.Module = classifier
            summary["test_accuracy"] = accuracy
            log.info("feature classifier test accuracy %.4f", accuracy)
        else:
            extractor = InceptionFeatures(config.features.inception_weights).to(device)
        test_images = torch.from_numpy(data.load_images(paths.IMAGE_DATA, "test")[0])
        test_mu, test_sigma = features_to_stats(extract_features(extractor, test_images, device=device).numpy())
        np.save(tmp / "test_mu.npy", test_mu)
        np.save(tmp / "test_sigma.npy", test_sigma)
        floor_images = sample_real_images(config.evaluate.num_image_samples, config.seed)
        floor_mu, floor_sigma = features_to_stats(extract_features(extractor, floor_images, device=device).numpy())
        summary.update({
            "fid_floor": frechet_distance(floor_mu, floor_sigma, test_mu, test_sigma),
            "floor_samples": int(floor_images.shape[0]), "test_images": int(test_images.shape[0]),
        })
        log.info("FID floor (%d real train images vs %d test images): %.3f", floor_images.shape[0],
                 test_images.shape[0], summary["fid_floor"])
        atomic_write_json(tmp / "summary.json", {**summary, **clock.record()})
    return out


def check_feature_space(config: PipelineConfig) -> None:
    """The classifier extractor needs labels of two classes or more: refuse before any work otherwise."""
    manifest = data.load_image_manifest(paths.IMAGE_DATA)
    if config.features.extractor == "classifier" and manifest["num_classes"] < 2:
        raise DataError(f"{manifest['dataset']}: the prepared images ({manifest['source']['location']}) have no "
                        f"labels of two or more classes to train the FID feature classifier on "
                        f"(features.extractor: classifier); set features.extractor: inception")


def sample_real_images(count: int, seed: int) -> torch.Tensor:
    """``count`` real training images chosen with ``seed`` (all of them if there are fewer)."""
    images = torch.from_numpy(data.load_images(paths.IMAGE_DATA, "train")[0])
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    chosen = images[order[:count]]
    if data.is_dynamically_binarized(paths.IMAGE_DATA):  # compare like with the binarized test split
        chosen = data.binarize(chosen, torch.Generator().manual_seed(seed))
    return chosen
