"""Sample-based image metrics in a feature space: k-NN precision/recall/density/coverage,
KID, an Inception-style score and a memorisation measure.

- Improved precision and recall: Kynkäänniemi, Karras, Laine, Lehtinen & Aila, "Improved
  Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019 (arXiv:1904.06991).
  The real (or generated) manifold is the union of balls around each point with the radius of
  its k-th nearest neighbour in the same set; precision is the share of samples inside the real
  manifold, recall the share of real points inside the generated one.
- Density and coverage: Naeem, Oh, Uh, Choi & Yoo, "Reliable Fidelity and Diversity Metrics
  for Generative Models", ICML 2020 (arXiv:2002.09797). Density counts how many real balls
  contain each sample (divided by k, so real data scores about 1); coverage is the share of
  real points whose ball contains at least one sample.
- KID: Bińkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018
  (arXiv:1801.01401): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets.
- Inception score: Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016
  (arXiv:1606.03498): exp E_x[KL(p(y|x) || p(y))], p(y) the mean of p(y|x) over the set.
- Memorisation: the median distance from a sample to its nearest *training* image, divided by
  the median distance from a real *test* image to its nearest training image. Unseen real data
  scores about 1; a model that copies its training set scores near 0.

Every function takes feature arrays (N, D) (float, any dtype: computed in float64) and is
pure. ``SampleMetrics`` precomputes the real side once so that a bootstrap over samples
(``genai_models.metrics.intervals``) costs little per replicate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from genai_models.metrics.fid import _psd_sqrt, features_to_stats


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (Na, Nb) between the rows of a (Na, D) and b (Nb, D), float64.

    Computed as sqrt(|a|^2 + |b|^2 - 2 a.b) (the expansion scikit-learn uses), clipped at 0.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(squared, 0.0, None))


def knn_radii(self_distances: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in its own set, (N,).

    ``self_distances`` is the (N, N) distance matrix of the set with itself; the point itself
    (distance 0) is not counted as a neighbour, but an identical copy of it is.
    """
    n = self_distances.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the set size - 1 ({n - 1}), got {k}")
    return np.partition(self_distances, k, axis=1)[:, k]


def manifold_metrics(real_fake: np.ndarray, real_radii: np.ndarray, fake_radii: np.ndarray,
                     k: int) -> dict[str, float]:
    """Precision, recall, density and coverage from precomputed distances.

    real_fake: (N_real, N_fake) distances; real_radii (N_real,), fake_radii (N_fake,): k-NN radii.
    """
    inside_real = real_fake < real_radii[:, None]             # sample j inside real ball i
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((real_fake < fake_radii[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum(axis=0).mean() / k),
        "coverage": float((real_fake.min(axis=1) < real_radii).mean()),
    }


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """The four k-NN manifold metrics of ``fake`` (N_fake, D) against ``real`` (N_real, D)."""
    return manifold_metrics(pairwise_distances(real, fake), knn_radii(pairwise_distances(real, real), k),
                            knn_radii(pairwise_distances(fake, fake), k), k)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The KID kernel (a.b / D + 1)^3 between rows, (Na, Nb)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: within-set sums leave out the diagonal.

    k_xx (m, m), k_yy (n, n), k_xy (m, n); m, n >= 2.
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int,
                              rng: np.random.Generator) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over ``subsets`` random subsets.

    Each subset draws ``subset_size`` rows of each set without replacement (capped at the set
    sizes), as in Bińkowski et al. and torch-fidelity / torchmetrics.
    """
    return _kid_from_kernels(polynomial_kernel(real, real), polynomial_kernel(fake, fake),
                             polynomial_kernel(real, fake), subsets, subset_size, rng)


def _kid_from_kernels(k_rr: np.ndarray, k_ff: np.ndarray, k_rf: np.ndarray, subsets: int, subset_size: int,
                      rng: np.random.Generator) -> tuple[float, float]:
    size = min(subset_size, k_rr.shape[0], k_ff.shape[0])
    values = []
    for _ in range(subsets):
        r = rng.choice(k_rr.shape[0], size, replace=False)
        f = rng.choice(k_ff.shape[0], size, replace=False)
        values.append(mmd2_unbiased(k_rr[np.ix_(r, r)], k_ff[np.ix_(f, f)], k_rf[np.ix_(r, f)]))
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def inception_score(probs: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """exp E_x[KL(p(y|x) || p(y))] of class probabilities (N, K): mean and std over ``splits`` parts.

    With ``splits`` = 10 and 50,000 samples of the TF-Inception logits this is the published
    protocol (Salimans et al.); one split uses every sample for p(y).
    """
    probs = np.asarray(probs, np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (_safe_log(part) - _safe_log(marginal))).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std()) if splits > 1 else 0.0


def _safe_log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-30, None))  # 0 * log 0 counts as 0


def nearest_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Distance from each query row to its nearest reference row, (N_queries,), in chunks."""
    return np.concatenate([pairwise_distances(queries[i:i + chunk], reference).min(axis=1)
                           for i in range(0, queries.shape[0], chunk)])


def memorization_ratio(fake_to_train: np.ndarray, test_to_train: np.ndarray) -> float:
    """median(sample -> nearest training image) / median(test image -> nearest training image)."""
    return float(np.median(fake_to_train) / max(np.median(test_to_train), 1e-12))


@dataclass
class RealReference:
    """The real side of every image metric, computed once.

    test: (N, D) features of the real test images the k-NN metrics and KID compare against;
    train: (M, D) features of training images, the memorisation measure's reference;
    k: the k of the k-NN radii;
    fid_mu, fid_sigma: FID statistics of the whole test split (default: those of ``test``).
    """

    test: np.ndarray
    train: np.ndarray
    k: int
    fid_mu: np.ndarray | None = None
    fid_sigma: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.test = np.asarray(self.test, np.float64)
        self.train = np.asarray(self.train, np.float64)
        if self.fid_mu is None or self.fid_sigma is None:
            self.fid_mu, self.fid_sigma = features_to_stats(self.test)
        self.fid_sigma = (np.asarray(self.fid_sigma, np.float64) + np.asarray(self.fid_sigma, np.float64).T) / 2
        self.sqrt_sigma = _psd_sqrt(self.fid_sigma)
        self.radii = knn_radii(pairwise_distances(self.test, self.test), self.k)
        self.kernel = polynomial_kernel(self.test, self.test)
        self.test_to_train = nearest_distances(self.test, self.train)


class SampleMetrics:
    """Every sample-based image metric of one set of samples against a ``RealReference``.

    ``compute(index)`` evaluates them on the samples ``index`` (with repeats: a bootstrap
    replicate) from matrices computed once; ``compute()`` is the plain estimate on all samples.
    ``probs`` (N, K) are the feature network's class probabilities (for the Inception-style score).
    """

    def __init__(self, reference: RealReference, features: np.ndarray, probs: np.ndarray | None,
                 kid_subsets: int, kid_subset_size: int, seed: int) -> None:
        self.ref = reference
        self.features = np.asarray(features, np.float64)
        self.probs = None if probs is None else np.asarray(probs, np.float64)
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self.real_fake = pairwise_distances(reference.test, self.features)   # (N_real, N)
        self.fake_fake = pairwise_distances(self.features, self.features)    # (N, N)
        self.kernel_ff = polynomial_kernel(self.features, self.features)
        self.kernel_rf = polynomial_kernel(reference.test, self.features)
        self.to_train = nearest_distances(self.features, reference.train)    # (N,)

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def compute(self, index: np.ndarray | None = None) -> dict[str, float]:
        """All metrics on samples ``index`` (default: every sample once, KID over random subsets).

        A bootstrap replicate (``index`` given) measures KID as the unbiased MMD^2 over all its
        samples: the subset average estimates the same quantity with more noise.
        """
        plain = index is None
        index = np.arange(self.size) if plain else np.asarray(index)
        features = self.features[index]
        ff = self.fake_fake[np.ix_(index, index)]
        # A repeated sample is its own neighbour at distance 0 in a replicate, like a duplicate
        # sample would be in a plain draw; only the point itself is left out (k + 1-th smallest).
        fake_radii = np.partition(ff, self.ref.k, axis=1)[:, self.ref.k]
        metrics = manifold_metrics(self.real_fake[:, index], self.ref.radii, fake_radii, self.ref.k)
        mu, sigma = features_to_stats(features)
        metrics["fid"] = frechet_distance_from_sqrt(self.ref.fid_mu, self.ref.fid_sigma, self.ref.sqrt_sigma, mu, sigma)
        kernel_ff, kernel_rf = self.kernel_ff[np.ix_(index, index)], self.kernel_rf[:, index]
        if plain:
            metrics["kid"], metrics["kid_std"] = _kid_from_kernels(
                self.ref.kernel, kernel_ff, kernel_rf, self.kid_subsets, self.kid_subset_size,
                np.random.default_rng(self.seed))
        else:
            metrics["kid"] = mmd2_unbiased(self.ref.kernel, kernel_ff, kernel_rf)
        if self.probs is not None:
            metrics["inception_score"] = inception_score(self.probs[index])[0]
        metrics["memorization"] = memorization_ratio(self.to_train[index], self.ref.test_to_train)
        return metrics


def frechet_distance_from_sqrt(mu1: np.ndarray, sigma1: np.ndarray, sqrt_sigma1: np.ndarray, mu2: np.ndarray,
                       sigma2: np.ndarray) -> float:
    """``frechet_distance`` with sqrt(sigma1) already known (the real side of a bootstrap)."""
    sigma2 = (sigma2 + sigma2.T) / 2
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt, 0.0))
