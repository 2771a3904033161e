"""The feature space every sample metric is measured in, and the real data's place in it.

Written by the ``features`` step (``tasks.features``) into ``models/feature_extractor/``, read by
the training step's quality curve and by ``evaluate``:

    classifier.pt            the feature classifier (``extractor: classifier``)
    reference_test.npy       float64 features of the test images the k-NN metrics and KID compare against
    reference_train.npy      float32 features of the training images the memorisation measure searches
    test_mu.npy, test_sigma.npy   FID statistics of the whole test split
    summary.json             extractor, counts, classifier accuracy, the real-data floors of every metric

With ``extractor: inception`` the weights are the standard FID Inception file: a local
``features.inception_weights`` path, or downloaded once into torch's hub cache
(``$TORCH_HOME/hub/checkpoints``) and checked against its published sha256 prefix, or against
``features.inception_sha256`` when that is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genai_models.feature_extractor import (
    FID_INCEPTION_SHA256_PREFIX, FID_INCEPTION_URL, ClassifierSpec, DigitClassifier, FIDInception,
)
from genai_models.metrics.sample_quality import RealReference
from tasks import data, paths
from tasks.checkpoints import CheckpointError, load_torch
from tasks.config import PipelineConfig

log = logging.getLogger(__name__)

REFERENCE_TEST = "reference_test.npy"
REFERENCE_TRAIN = "reference_train.npy"


def inception_weights_path(config: PipelineConfig) -> Path:
    """The local FID Inception weights: the configured file, or the hub cache (downloaded if missing)."""
    if config.features.inception_weights:
        path = Path(config.features.inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"features.inception_weights: {path} is not a file")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_URL.rsplit("/", 1)[1]
    if not cached.is_file():
        from tasks.download import download_file

        log.info("downloading the FID Inception weights (~92 MB, once) to %s", cached)
        download_file(FID_INCEPTION_URL, cached, sha256=config.features.inception_sha256)
    return cached


def read_inception_weights(config: PipelineConfig) -> tuple[bytes, str]:
    """The weights file's bytes and sha256, verified (the same bytes are hashed and then loaded)."""
    path = inception_weights_path(config)
    weights = path.read_bytes()
    digest = hashlib.sha256(weights).hexdigest()
    expected = config.features.inception_sha256
    if expected and digest != expected.lower():
        raise CheckpointError(f"FID Inception weights {path}: sha256 is {digest}, "
                              f"features.inception_sha256 says {expected}")
    if not expected and not config.features.inception_weights and not digest.startswith(FID_INCEPTION_SHA256_PREFIX):
        path.unlink()  # our own download into the cache: the next run fetches it again
        raise CheckpointError(f"FID Inception weights {path}: sha256 {digest} does not start with "
                              f"{FID_INCEPTION_SHA256_PREFIX} (the published file's); removed it from the cache")
    return weights, digest


def load_inception(config: PipelineConfig, device: torch.device) -> tuple[FIDInception, str]:
    """The FID Inception network on ``device`` and the sha256 of its weights file."""
    weights, digest = read_inception_weights(config)
    try:
        network = FIDInception(weights)
    except Exception as err:  # unpickling or a state dict of other shapes
        raise CheckpointError(f"FID Inception weights {inception_weights_path(config)} do not load into "
                              f"torch-fidelity's InceptionV3: {type(err).__name__}: {err}") from None
    return network.to(device), digest


def load_extractor(config: PipelineConfig, device: torch.device) -> nn.Module:
    """The feature network this pipeline's sample metrics are measured with."""
    if config.features.extractor == "inception":
        return load_inception(config, device)[0]
    checkpoint = load_torch(paths.FEATURE_EXTRACTOR / "classifier.pt")
    model = DigitClassifier(data.image_spec(paths.IMAGE_DATA), ClassifierSpec(**checkpoint["classifier_spec"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def extractor_description(config: PipelineConfig) -> str:
    if config.features.extractor == "inception":
        return ("FID InceptionV3 (TF-compatible, torch-fidelity; weights inception-2015-12-05): 2048-d pool "
                "features, 1008-way logits for IS")
    return (f"DigitClassifier trained on the train split: {config.features.classifier.feature_dim}-d penultimate "
            "layer, its softmax for IS")


def load_summary() -> dict:
    """What the features step recorded: extractor, counts, accuracy, the real-data floors."""
    return json.loads((paths.FEATURE_EXTRACTOR / "summary.json").read_text())


def load_real_reference(config: PipelineConfig) -> RealReference:
    """The real side of every sample metric (test features, training features, FID statistics)."""
    folder = paths.FEATURE_EXTRACTOR
    return RealReference(test=np.load(folder / REFERENCE_TEST), train=np.load(folder / REFERENCE_TRAIN),
                         k=config.evaluate.k_nearest, fid_mu=np.load(folder / "test_mu.npy"),
                         fid_sigma=np.load(folder / "test_sigma.npy"))
