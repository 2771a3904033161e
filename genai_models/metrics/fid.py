"""Fréchet distance between Gaussians fitted to feature sets (the "FID" formula).

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium", https://arxiv.org/abs/1706.08500

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))

This module is feature-extractor agnostic: it turns (N, D) feature arrays into
statistics and statistics into a distance. Which network made the features (and
how many samples went in) is the caller's to record next to the number.

Tr(sqrtm(S1 S2)) is computed without a general (non-symmetric) matrix square
root: S1 S2 has the same eigenvalues as the symmetric PSD matrix
sqrt(S1) S2 sqrt(S1), so the trace is the sum of the square roots of that
matrix's eigenvalues. Two symmetric eigendecompositions are faster and more stable
than ``scipy.linalg.sqrtm`` and never produce complex round-off.
"""

from __future__ import annotations

import numpy as np


def features_to_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set.

    Args:
        features: (N, D) array, one row per example; N >= 2.

    Returns:
        ``(mu, sigma)``: mean (D,) and covariance (D, D) with ddof=1, both float64.

    Raises:
        ValueError: if ``features`` is not 2-D or has fewer than two rows.
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(
            f"features must be a 2-D (N, D) array with N >= 2, got shape {feats.shape}"
        )
    mu = feats.mean(axis=0)  # (D,)
    centered = feats - mu  # (N, D)
    sigma = centered.T @ centered / (feats.shape[0] - 1)  # (D, D)
    return mu, sigma


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    """Raise ValueError unless ``mu`` is (D,) and ``sigma`` is (D, D)."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: expected mu of shape (D,) and sigma of shape (D, D), "
            f"got mu {mu.shape} and sigma {sigma.shape}"
        )


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (D, D) PSD matrix; negative round-off clipped to 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)  # (D,), (D, D)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D), symmetric positive semi-definite.

    Returns:
        ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2))``
        as a float, computed in float64 and clipped at 0 (it is a squared distance;
        a tiny negative value is only round-off).

    Raises:
        ValueError: if the shapes are inconsistent within or between the two sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: mu1 {mu1.shape} vs mu2 {mu2.shape}"
        )
    # eigh reads one triangle only; symmetrise so both triangles count equally.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2

    sqrt_sigma1 = _psd_sqrt(sigma1)  # (D, D)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # (D, D), symmetric PSD in exact math
    inner_eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)  # (D,)
    trace_sqrt = np.sqrt(np.clip(inner_eigvals, 0.0, None)).sum()

    diff = mu1 - mu2  # (D,)
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets.

    Args:
        features_a: (N_a, D) features of one set (e.g. real images).
        features_b: (N_b, D) features of the other (e.g. samples).

    Returns:
        ``frechet_distance(*features_to_stats(a), *features_to_stats(b))``.
    """
    mu_a, sigma_a = features_to_stats(features_a)
    mu_b, sigma_b = features_to_stats(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
