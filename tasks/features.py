"""Feature-extractor step: the network the sample metrics are measured in, and the real data in it.

With ``features.extractor: classifier`` (the CPU default) a small CNN is trained on the real
training split; its test accuracy is reported beside every metric. With ``inception`` the standard
FID Inception weights are used (``tasks.feature_space``). This step then stores the real side of
every metric (test and training features, the test split's FID statistics) and each metric's
real-data floor: real training images in place of samples, at the sample count families are scored
with (memorisation: unseen validation images). What is written is listed in ``tasks.feature_space``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from genai_models.base import fast_optimizer_options
from genai_models.feature_extractor import ClassifierSpec, DigitClassifier, embed_images
from genai_models.metrics import features_to_stats
from genai_models.metrics.sample_quality import RealReference, SampleMetrics, memorization_ratio, nearest_distances
from tasks import data, paths
from tasks.checkpoints import save_torch
from tasks.config import PipelineConfig
from tasks.datasets import DataError
from tasks.feature_space import REFERENCE_TEST, REFERENCE_TRAIN, extractor_description, load_inception
from tasks.io import atomic_write_json, replace_directory
from tasks.runtime import Progress, StepClock, deterministic_on, device_name, resolve_device, seed_everything
from tasks.train import batch_indices

log = logging.getLogger(__name__)


def train_classifier(config: PipelineConfig, device: torch.device) -> tuple[DigitClassifier, float]:
    """Fit the classifier on the real training split; returns it and its test accuracy.

    The splits are copied to the device once; the loss is read back only when it is logged.
    """
    cfg = config.features.classifier
    train_x, train_y = (torch.from_numpy(a).to(device) for a in data.load_images(paths.IMAGE_DATA, "train"))
    test_x, test_y = (torch.from_numpy(a).to(device) for a in data.load_images(paths.IMAGE_DATA, "test"))
    seed_everything(config.seed, deterministic_on(config.performance.deterministic, device))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    model = DigitClassifier(data.image_spec(paths.IMAGE_DATA), ClassifierSpec(num_classes, cfg.feature_dim)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, **fast_optimizer_options(model.parameters()))
    binarized = data.is_dynamically_binarized(paths.IMAGE_DATA)  # then it sees images like the test split's
    model.train()
    log.info("training the feature classifier: %d steps of batch %d on %d images", cfg.steps, cfg.batch_size,
             train_x.shape[0])
    progress = Progress("feature classifier", cfg.steps, "steps", logger=log)
    for step in range(cfg.steps):
        index = batch_indices(step, train_x.shape[0], cfg.batch_size, config.seed).to(device)
        batch = train_x[index]
        if binarized:
            batch = data.binarize(batch, torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + step))
        loss = F.cross_entropy(model(batch), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log.info("feature classifier step %d/%d  loss %.4f", step + 1, cfg.steps, loss.item())
        progress.update(step + 1)
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(test_x[i:i + 1000]).argmax(1) for i in range(0, test_x.shape[0], 1000)])
    return model, float((predictions == test_y).float().mean())


def build_feature_extractor(config: PipelineConfig) -> Path:
    """Write ``models/feature_extractor/``: the extractor, the real reference, every metric's floor."""
    clock = StepClock("features")
    check_feature_space(config)
    device = resolve_device(config.device)
    summary: dict = {"extractor": config.features.extractor, "description": extractor_description(config),
                     "device": device_name(device)}
    with replace_directory(paths.FEATURE_EXTRACTOR) as tmp:
        if config.features.extractor == "classifier":
            extractor, accuracy = train_classifier(config, device)
            save_torch({"classifier_spec": {"num_classes": extractor.head.out_features,
                                            "feature_dim": extractor.head.in_features},
                        "state_dict": {k: v.cpu() for k, v in extractor.state_dict().items()}},
                       tmp / "classifier.pt")
            summary["test_accuracy"] = accuracy
            log.info("feature classifier test accuracy %.4f", accuracy)
        else:
            extractor, summary["inception_sha256"] = load_inception(config, device)
        reference = write_real_reference(config, extractor, device, tmp, summary)
        summary["floor"] = real_data_floor(config, extractor, reference, device)
        log.info("real-data floor: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary["floor"].items()))
        atomic_write_json(tmp / "summary.json", {**summary, **clock.record()})
    return paths.FEATURE_EXTRACTOR


def check_feature_space(config: PipelineConfig) -> None:
    """The classifier extractor needs labels of two classes or more: refuse before any work otherwise."""
    manifest = data.load_image_manifest(paths.IMAGE_DATA)
    if config.features.extractor == "classifier" and manifest["num_classes"] < 2:
        raise DataError(f"{manifest['dataset']}: the prepared images ({manifest['source']['location']}) have no "
                        f"labels of two or more classes to train the FID feature classifier on "
                        f"(features.extractor: classifier); set features.extractor: inception")


def _embed(extractor: nn.Module, images: torch.Tensor, device: torch.device, what: str,
           chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Features and class probabilities of ``images``, in chunks so that a slow network (Inception on a CPU)
    shows progress."""
    log.info("features of %d %s", images.shape[0], what)
    if images.shape[0] <= chunk:
        features, probs = embed_images(extractor, images, device=device)
        return features.numpy(), probs.numpy()
    progress, parts = Progress(f"features of {what}", images.shape[0], "images", logger=log), []
    for start in range(0, images.shape[0], chunk):  # a multiple of embed_images' batch: the same numbers
        parts.append(embed_images(extractor, images[start:start + chunk], device=device))
        progress.update(start + parts[-1][0].shape[0])
    return torch.cat([f for f, _ in parts]).numpy(), torch.cat([p for _, p in parts]).numpy()


def write_real_reference(config: PipelineConfig, extractor: nn.Module, device: torch.device, out: Path,
                         summary: dict) -> RealReference:
    """Test features (FID statistics of all; the k-NN / KID reference of ``num_image_samples`` of them)
    and training features (the memorisation reference), saved in ``out``."""
    test_images = torch.from_numpy(data.load_images(paths.IMAGE_DATA, "test")[0])
    test_features, _ = _embed(extractor, test_images, device, "test images")
    mu, sigma = features_to_stats(test_features)
    np.save(out / "test_mu.npy", mu)
    np.save(out / "test_sigma.npy", sigma)
    count = min(config.evaluate.num_image_samples, test_features.shape[0])
    chosen = np.random.default_rng(config.seed).permutation(test_features.shape[0])[:count]
    np.save(out / REFERENCE_TEST, test_features[np.sort(chosen)])
    train_images = real_images("train", config.features.max_reference_images, config.seed)
    train_features, _ = _embed(extractor, train_images, device, "training images (memorisation reference)")
    np.save(out / REFERENCE_TRAIN, train_features.astype(np.float32))
    summary.update(test_images=int(test_images.shape[0]), reference_test_images=count,
                   reference_train_images=int(train_images.shape[0]))
    return RealReference(test=test_features[np.sort(chosen)], train=train_features.astype(np.float32),
                         k=config.evaluate.k_nearest, fid_mu=mu, fid_sigma=sigma)


def real_data_floor(config: PipelineConfig, extractor: nn.Module, reference: RealReference,
                    device: torch.device) -> dict[str, float]:
    """Every sample metric with real training images in place of samples (memorisation: validation images)."""
    images = real_images("train", config.evaluate.num_image_samples, config.seed)
    features, probs = _embed(extractor, images, device, "real training images (the floor)")
    floor = SampleMetrics(reference, features, probs, config.evaluate.kid_subsets, config.evaluate.kid_subset_size,
                          config.seed).compute()
    floor.pop("kid_std")
    val_features, _ = _embed(extractor, real_images("val", config.evaluate.num_image_samples, config.seed),
                             device, "validation images (the memorisation floor)")
    floor["memorization"] = memorization_ratio(nearest_distances(val_features, reference.train),
                                               reference.test_to_train)
    return floor


def real_images(split: str, count: int, seed: int) -> torch.Tensor:
    """``count`` real images of ``split`` chosen with ``seed`` (all of them if there are fewer).

    Training images of a dynamically binarized data set are binarized (once, with ``seed``) so they
    compare like with the binarized test split.
    """
    images = torch.from_numpy(data.load_images(paths.IMAGE_DATA, split)[0])
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    chosen = images[order[:count]]
    if split == "train" and data.is_dynamically_binarized(paths.IMAGE_DATA):
        chosen = data.binarize(chosen, torch.Generator().manual_seed(seed))
    return chosen
