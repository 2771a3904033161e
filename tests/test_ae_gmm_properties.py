"""Autoencoder + latent mixture: the mixture density against scipy, the EM fit against scikit-learn,
and the sampler that ``after_fit`` leaves in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture as SklearnMixture

from genai_models.ae_gmm import AEGMM, AEGMMConfig, GaussianMixture, fit_gaussian_mixture
from tasks.checkpoints import load_model, model_checkpoint, save_torch
from tests.conftest import TINY_CONFIGS, TINY_IMAGE, tiny_batch


def _three_clusters(n: int = 900, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 7.0, -2.0]])
    scales = [np.diag([1.0, 0.5, 0.3]), np.array([[1.0, 0.6, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.5]]), 0.7 * np.eye(3)]
    points = [rng.standard_normal((n // 3, 3)) @ scale.T + centre for centre, scale in zip(centres, scales)]
    return torch.from_numpy(np.concatenate(points))


def test_mixture_log_density_equals_scipy():
    g = torch.Generator().manual_seed(0)
    k, d = 3, 4
    raw = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(raw @ raw.transpose(1, 2) + torch.eye(d, dtype=torch.float64))
    mixture = GaussianMixture(torch.randn(k, generator=g, dtype=torch.float64),
                              torch.randn(k, d, generator=g, dtype=torch.float64), scale_tril)
    x = torch.randn(20, d, generator=g, dtype=torch.float64)
    weights = torch.softmax(mixture.logits, 0).numpy()
    covariances = (scale_tril @ scale_tril.transpose(1, 2)).numpy()
    expected = np.log(sum(w * stats.multivariate_normal(m, c).pdf(x.numpy())
                          for w, m, c in zip(weights, mixture.means.numpy(), covariances)))
    assert np.allclose(mixture.log_prob(x).numpy(), expected, atol=1e-10)


def test_em_fit_reaches_scikit_learns_likelihood_and_clusters():
    x = _three_clusters()
    mixture, mean_ll = fit_gaussian_mixture(x, 3, iterations=300, covariance_floor=1e-6,
                                            generator=torch.Generator().manual_seed(0))
    reference = SklearnMixture(3, covariance_type="full", reg_covar=1e-6, tol=1e-8, max_iter=500,
                               random_state=0).fit(x.numpy())
    assert mean_ll == pytest.approx(float(reference.score(x.numpy())), abs=1e-3)
    ours = mixture.means[torch.argsort(mixture.means[:, 0] + 10 * mixture.means[:, 1])].numpy()
    theirs = reference.means_[np.argsort(reference.means_[:, 0] + 10 * reference.means_[:, 1])]
    assert np.allclose(ours, theirs, atol=1e-3)
    assert np.allclose(torch.softmax(mixture.logits, 0).sort().values.numpy(), np.full(3, 1 / 3), atol=1e-3)


def test_fit_refuses_fewer_points_than_components():
    with pytest.raises(ValueError, match="cannot fit 5 mixture components to 4 points"):
        fit_gaussian_mixture(torch.randn(4, 2), 5, 10, 1e-4, torch.Generator().manual_seed(0))


def _tiny_ae() -> AEGMM:
    torch.manual_seed(0)
    return AEGMM(AEGMMConfig(**TINY_CONFIGS["ae_gmm"]), TINY_IMAGE)


def test_after_fit_fits_the_sampler_to_the_codes_and_it_is_saved(tmp_path):
    model = _tiny_ae().eval()
    images = tiny_batch("image", batch_size=64, seed=1)
    before = model.sample(200, torch.Generator().manual_seed(0))
    model.after_fit(images, torch.Generator().manual_seed(0))
    assert bool(model.mixture_fitted)
    codes = model.encode(images).detach().double()
    fitted = GaussianMixture(model.mixture_logits.double(), model.mixture_means.double(),
                             model.mixture_scale_tril.double())
    standard = GaussianMixture(torch.zeros(1, dtype=torch.float64), torch.zeros(1, codes.shape[1], dtype=torch.float64),
                               torch.eye(codes.shape[1], dtype=torch.float64)[None])
    assert fitted.log_prob(codes).mean() > standard.log_prob(codes).mean()    # the codes, not N(0, I)
    after = model.sample(200, torch.Generator().manual_seed(0))
    assert not torch.equal(before, after)

    path = tmp_path / "model.pt"
    save_torch(model_checkpoint(model, "ae_gmm"), path)
    loaded = load_model(path)
    assert bool(loaded.mixture_fitted)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.sample(16, generator()), model.sample(16, generator()))


def test_samples_decode_codes_drawn_from_the_mixture():
    """With one tight component, every sample is the decoding of (nearly) its mean."""
    model = _tiny_ae().eval()
    with torch.no_grad():
        model.mixture_means[:] = torch.tensor([0.5, -1.0, 2.0, 0.0])
        model.mixture_scale_tril[:] = 1e-6 * torch.eye(4)
        model.mixture_logits[:] = torch.tensor([0.0, -1e4])
        expected = model.decoder(model.mixture_means[:1]).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    samples = model.sample(5, torch.Generator().manual_seed(0))
    assert (samples.int() - expected.int()).abs().max() <= 1
