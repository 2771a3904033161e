"""The standard FID Inception path: local weights, checksums, weights-only loading, and its outputs.

Tests never download: they build a weights file of the right shapes locally (torchvision's
InceptionV3 with the 1008-way head, untrained), which loads into torch-fidelity's TF-compatible port.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
import yaml

from tasks.checkpoints import CheckpointError
from tasks.config import parse_params
from tasks.feature_space import inception_weights_path, load_inception, read_inception_weights
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008).state_dict()
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(state, path)
    return path


def _config(**features):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["features"].update(extractor="inception", **features)
    return parse_params(params)


def test_local_weights_load_into_the_fid_inception_and_embed_images(weights_file):
    network, digest = load_inception(_config(inception_weights=str(weights_file)), torch.device("cpu"))
    assert digest == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)      # MNIST-like: repeated to RGB
    features, probs = network.embed(grey)
    assert features.shape == (2, 2048) and probs.shape == (2, 1008)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    colour = grey.expand(-1, 3, -1, -1).clone()
    assert torch.allclose(network.embed(colour)[0], features)


def test_a_pinned_checksum_must_match(weights_file):
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"features.inception_sha256 says {wrong}"):
        read_inception_weights(_config(inception_weights=str(weights_file), inception_sha256=wrong))
    right = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert read_inception_weights(_config(inception_weights=str(weights_file), inception_sha256=right))[1] == right


def test_a_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="features.inception_weights: .*nothere.pth is not a file"):
        inception_weights_path(_config(inception_weights=str(tmp_path / "nothere.pth")))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "crafted.pth"
    crafted.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": Exploit()}))
    with pytest.raises(CheckpointError, match="do not load into torch-fidelity"):
        load_inception(_config(inception_weights=str(crafted)), torch.device("cpu"))
    assert not marker.exists()


def test_a_cached_download_that_fails_its_published_checksum_is_removed(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = inception_weights_path.__globals__["FID_INCEPTION_URL"].rsplit("/", 1)[1]
    path = tmp_path / "hub" / "checkpoints" / cached
    path.parent.mkdir(parents=True)
    path.write_bytes(weights_file.read_bytes())       # not the published file: its sha256 differs
    assert inception_weights_path(_config()) == path   # found in the cache: nothing is downloaded
    with pytest.raises(CheckpointError, match="does not start with 6726825d"):
        read_inception_weights(_config())
    assert not path.exists()
