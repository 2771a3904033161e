"""95% intervals for sample-based metrics: a bootstrap over the generated samples.

What the interval answers: *where would this number land if the evaluation were repeated with a
fresh draw of the same number of samples from the same trained model?* That is what a reader
comparing two rows needs (and what re-running the evaluation with another sample seed checks).

How: B bootstrap replicates resample the n samples with replacement and recompute the metric
(Efron & Tibshirani 1993). The replicates' spread around their own mean estimates how the metric
varies from draw to draw; their mean is not used, because set-level metrics (FID, recall,
coverage, KID, distinct-n) are biased by the repeats a replicate contains. The estimate shown and
a fresh draw both vary by that spread, so the deviation between them spreads sqrt(2) times as
wide: the interval is ``estimate + sqrt(2) * (2.5th, 97.5th percentile of replicate - replicate
mean)``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

INTERVAL_HOW = ("95% interval for a fresh draw of the same number of samples: bootstrap over the samples "
                "({replicates} replicates), the replicates' 2.5-97.5 percentile spread around their mean, "
                "widened by sqrt(2) (the estimate and a fresh draw both vary), placed around the estimate")


def redraw_interval(estimate: float, replicates: np.ndarray) -> tuple[float, float]:
    """(low, high) from an estimate and its bootstrap replicates, as described in the module docstring."""
    replicates = np.asarray(replicates, np.float64)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size < 2:
        return estimate, estimate
    low, high = np.percentile(replicates - replicates.mean(), [2.5, 97.5])
    return estimate + math.sqrt(2.0) * float(low), estimate + math.sqrt(2.0) * float(high)


def bootstrap_intervals(
    statistic: Callable[[np.ndarray | None], dict[str, float]], size: int, replicates: int, seed: int,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Estimates and re-draw intervals of every metric ``statistic`` returns.

    ``statistic(None)`` is the plain estimate on all ``size`` samples; ``statistic(index)``
    recomputes the metrics on the samples ``index`` (an (size,) array with repeats). Metrics the
    replicates do not return (e.g. a companion standard deviation) get no interval.
    """
    estimate = statistic(None)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(replicates):
        for name, value in statistic(rng.integers(0, size, size)).items():
            draws.setdefault(name, []).append(value)
    intervals = {name: redraw_interval(estimate[name], np.asarray(values))
                 for name, values in draws.items() if name in estimate}
    return estimate, intervals


def mean_with_interval(scores: np.ndarray, replicates: int, seed: int) -> tuple[float, tuple[float, float]]:
    """Mean of per-item scores (e.g. sentence BLEU) and its re-draw interval by the same bootstrap."""
    scores = np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([scores[rng.integers(0, scores.size, scores.size)].mean() for _ in range(replicates)])
    estimate = float(scores.mean())
    return estimate, redraw_interval(estimate, means)
