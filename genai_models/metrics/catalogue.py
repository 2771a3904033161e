"""Every metric the pipeline reports, declared once.

Evaluation emits only keys declared here (tests/test_catalogue.py checks every family), and the
report builds its tables, labels, arrows and verdict from these declarations, so a metric's name,
unit and direction exist in one place (torchmetrics keeps ``higher_is_better`` on the metric
itself for the same reason).

A reported metric is a ``MetricValue``: the estimate, and where the metric has them its 95%
interval (``genai_models.metrics.intervals``), its real-data floor and untrained-model ceiling,
and the mean and spread over training seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Better = Literal["lower", "higher", "closer to 1"]
Group = Literal["samples", "likelihood", "binarized", "text"]

_SAMPLES_FLOOR = "real training images in place of samples, same count, against the test split"
_SAMPLES_CEILING = "samples of the same architecture, untrained"


@dataclass(frozen=True)
class Metric:
    """One reported quantity: how to show it, which way is better, and how it is made."""

    key: str
    label: str
    unit: str
    better: Better
    modality: Literal["image", "text"]
    group: Group
    how: str
    floor: str | None = None      # what the "floor" yardstick is (real data), if the metric has one
    ceiling: str | None = None    # what the "ceiling" yardstick is (an untrained model), if any
    interval: bool = False        # a sample-based number: reported with a 95% re-draw interval
    verdict: str | None = None    # the question of the report's summary this metric answers
    bounds: tuple[float | None, float | None] = (None, None)  # the values it can take (intervals are clipped)
    spread: str = "over subsets"  # what the ± beside a value (``MetricValue.std``) is, where the metric has one

    def clip(self, value: float) -> float:
        """``value`` moved into the metric's range (an interval end past a hard limit means the limit)."""
        low, high = self.bounds
        value = value if low is None else max(low, value)
        return value if high is None else min(high, value)

    def is_better(self, a: float, b: float) -> bool:
        """Whether value ``a`` is strictly better than ``b`` on this metric."""
        if self.better == "lower":
            return a < b
        if self.better == "higher":
            return a > b
        return abs(a - 1.0) < abs(b - 1.0)


_UNIT_RANGE = (0.0, 1.0)
_POSITIVE = (0.0, None)


def _image(key: str, label: str, better: Better, how: str, *, unit: str = "", verdict: str | None = None,
           floor: str = _SAMPLES_FLOOR, bounds: tuple[float | None, float | None] = _POSITIVE) -> Metric:
    return Metric(key, label, unit, better, "image", "samples", how, floor=floor, ceiling=_SAMPLES_CEILING,
                  interval=True, verdict=verdict, bounds=bounds)


def _likelihood(key: str, label: str, unit: str, how: str, verdict: str | None = None) -> Metric:
    return Metric(key, label, unit, "lower", "image", "likelihood", how, verdict=verdict)


def _binarized(key: str, label: str, unit: str, how: str) -> Metric:
    return Metric(key, label, unit, "lower", "image", "binarized", how, spread="s.e. over AIS runs")


def _text(key: str, label: str, better: Better, how: str, *, unit: str = "", floor: str | None = None,
          interval: bool = True, verdict: str | None = None,
          bounds: tuple[float | None, float | None] = _UNIT_RANGE) -> Metric:
    return Metric(key, label, unit, better, "text", "text", how, floor=floor, interval=interval, verdict=verdict,
                  bounds=bounds)


_REAL_TEXT = "real validation sentences in place of samples, same count"
_BLEU = "mean sentence BLEU against every test sentence (Texygen: nltk method-1 smoothing, uniform weights)"
_SELF_BLEU = "mean sentence BLEU of each generated sentence against the other generated ones (Texygen)"

METRICS: tuple[Metric, ...] = (
    # --- image samples, in the feature network's space ----------------------------------------
    _image("fid", "FID", "lower", "Fréchet distance between Gaussians fitted to sample and test-split features "
           "(Heusel et al. 2017)", verdict="sample quality"),
    _image("kid", "KID", "lower", "unbiased MMD² with the cubic polynomial kernel, mean over random subsets "
           "(Bińkowski et al. 2018); its std over subsets is shown beside it", bounds=(None, None)),
    _image("precision", "precision", "higher", "share of samples inside the k-NN balls of the test features "
           "(Kynkäänniemi et al. 2019)", verdict="fidelity", bounds=_UNIT_RANGE),
    _image("recall", "recall", "higher", "share of test features inside the k-NN balls of the samples "
           "(Kynkäänniemi et al. 2019)", bounds=_UNIT_RANGE),
    _image("density", "density", "higher", "mean number of test k-NN balls holding each sample, divided by k "
           "(Naeem et al. 2020); real data scores about 1"),
    _image("coverage", "coverage", "higher", "share of test features whose k-NN ball holds a sample "
           "(Naeem et al. 2020)", verdict="diversity", bounds=_UNIT_RANGE),
    _image("inception_score", "IS", "higher", "exp E[KL(p(y|x) || p(y))] of the feature network's class "
           "probabilities over all samples (one split)", bounds=(1.0, None)),
    _image("memorization", "memorisation", "closer to 1",
           "median distance of a sample to its nearest training image / the same median for real test images; "
           "about 1 for unseen real data, near 0 for copies of the training set",
           floor="real validation images (unseen in training) in place of samples"),
    # --- image likelihoods: nats per image of the 8-bit test split, and bits/dim ----------------
    _likelihood("nll_bits_per_dim", "NLL bits/dim (exact, or the tightest bound)", "bits/dim",
                "the family's exact NLL where it has one, else its tightest upper bound", verdict="likelihood"),
    _likelihood("nll_nats", "NLL", "nats/image", "exact negative log-likelihood"),
    _likelihood("bits_per_dim", "NLL bits/dim", "bits/dim", "exact NLL / (C·H·W·ln 2)"),
    _likelihood("nll_elbo_nats", "−ELBO", "nats/image", "variational (or dequantization) bound, one draw"),
    _likelihood("bits_per_dim_elbo", "−ELBO bits/dim", "bits/dim", "the −ELBO / (C·H·W·ln 2)"),
    _likelihood("nll_iwae_nats", "IWAE bound", "nats/image", "importance-weighted bound"),
    _likelihood("bits_per_dim_iwae", "IWAE bits/dim", "bits/dim", "the IWAE bound / (C·H·W·ln 2)"),
    # --- black/white image models (rbm): -log P of *binarized* test images, never an 8-bit NLL ----
    _binarized("nll_ais_nats", "AIS NLL estimate", "nats/binarized image",
               "F(v) + log Z_hat of the test images binarized once (pixel white with probability level/255); log Z "
               "by annealed importance sampling (Salakhutdinov & Murray 2008); ± its standard error over AIS runs, "
               "interval ±1.96 s.e.; neither exact nor a bound (a finite AIS run tends to underestimate log Z)"),
    _binarized("bits_per_dim_ais", "AIS NLL bits/dim", "bits/binary pixel",
               "the AIS NLL / (C·H·W·ln 2); a uniform model of black/white pixels scores exactly 1, so it does not "
               "compare with 8-bit bits/dim"),
    # --- text ----------------------------------------------------------------------------------
    *(_text(f"bleu{n}", f"BLEU-{n}", "higher", _BLEU, floor=_REAL_TEXT,
            verdict="closeness to real text" if n == 4 else None) for n in (2, 3, 4)),
    *(_text(f"self_bleu{n}", f"Self-BLEU-{n}", "lower", _SELF_BLEU, floor=_REAL_TEXT,
            verdict="diversity" if n == 4 else None) for n in (2, 3, 4)),
    *(_text(f"distinct{n}", f"distinct-{n}", "higher", f"distinct {n}-grams / all {n}-grams over every generated "
            "token (Li et al. 2016)", floor=_REAL_TEXT) for n in (1, 2)),
    _text("nll_per_token", "NLL", "lower", "exact test NLL per token (eos counted, bos not)", unit="nats/token",
          interval=False, bounds=_POSITIVE),
    _text("perplexity", "perplexity", "lower", "exp(test NLL per token)", interval=False, verdict="likelihood",
          bounds=(1.0, None)),
    _text("perplexity_per_word", "perplexity / word", "lower",
          "exp(total test NLL / words): compares models whose tokenizers differ", interval=False, bounds=(1.0, None)),
)

CATALOGUE: dict[str, Metric] = {}
for _metric in METRICS:
    if _metric.key in CATALOGUE:
        raise ValueError(f"metric {_metric.key!r} is declared twice")
    CATALOGUE[_metric.key] = _metric


def get_metric(key: str) -> Metric:
    """The declaration of ``key``; an undeclared key is an error naming it."""
    try:
        return CATALOGUE[key]
    except KeyError:
        raise KeyError(f"metric {key!r} is not declared in genai_models/metrics/catalogue.py") from None


def metrics_for(modality: str, group: Group | None = None) -> list[Metric]:
    """Declared metrics of a modality (and table group), in declaration order."""
    return [m for m in METRICS if m.modality == modality and (group is None or m.group == group)]


@dataclass
class MetricValue:
    """A reported number and what stands beside it. Optional parts are None when not measured.

    value: the estimate (the headline model's, on all samples);
    low, high: its 95% re-draw interval (sample-based metrics);
    std: a spread the metric itself defines (KID: over subsets);
    floor, ceiling: real-data and untrained-model yardsticks;
    seed_mean, seed_std, seed_count: over the models trained with every training seed.
    """

    value: float
    low: float | None = None
    high: float | None = None
    std: float | None = None
    floor: float | None = None
    ceiling: float | None = None
    seed_mean: float | None = None
    seed_std: float | None = None
    seed_count: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The non-empty parts, floats rounded to 6 significant digits (DVC metrics file)."""
        return {k: _round(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | float) -> "MetricValue":
        if isinstance(data, (int, float)):
            return cls(float(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown metric fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)

    def overlaps(self, other: "MetricValue") -> bool:
        """Whether the two 95% intervals overlap (no interval: only equal values overlap)."""
        low_a, high_a = (self.low, self.high) if self.low is not None else (self.value, self.value)
        low_b, high_b = (other.low, other.high) if other.low is not None else (other.value, other.value)
        return low_a <= high_b and low_b <= high_a


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0.0:
        return float(f"{value:.6g}")
    return value
