"""Evaluation step: trained models of one family -> declared metrics (JSON), how each was made, samples.

Images: every sample metric of ``genai_models.metrics.catalogue`` (FID, KID, precision, recall,
density, coverage, Inception-style score, memorisation) in the feature space of the ``features``
step, each with its 95% re-draw interval (``genai_models.metrics.intervals``), its real-data floor
and its untrained-model ceiling; and, where the family has one, the test NLL in nats per image and
bits/dim. Text: BLEU-2..4, Self-BLEU-2..4 and distinct-1/2 (on words, whatever the tokenizer) with
intervals and the real-text yardstick, test NLL per token, perplexity per token and per word.

Samples are drawn plainly (``GenerativeModel.plain_sampling``): those are the comparable numbers.
A family whose configured sampling is something else is measured that way too (``configured``).
With several training seeds every seed's model is measured, and the report shows their spread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genai_models.base import GenerativeModel
from genai_models.feature_extractor import embed_images
from genai_models.metrics import nats_to_bits_per_dim, perplexity
from genai_models.metrics.bleu import distinct_n, sentence_bleu_scores, sentence_self_bleu_scores
from genai_models.metrics.catalogue import MetricValue, get_metric
from genai_models.metrics.intervals import INTERVAL_HOW, bootstrap_intervals, mean_with_interval
from genai_models.metrics.sample_quality import RealReference, SampleMetrics
from genai_models.registry import get_family
from genai_models.text import count_words
from tasks import data, paths
from tasks.checkpoints import load_model
from tasks.config import PipelineConfig
from tasks.feature_space import extractor_description, load_extractor, load_real_reference, load_summary
from tasks.io import atomic_write_json, replace_directory
from tasks.runtime import StepClock, deterministic_on, device_name, package_version, resolve_device, seed_everything
from tasks.samples import draw_samples, seed_model_dir, write_samples

log = logging.getLogger(__name__)
BLEU_ORDERS = (2, 3, 4)


@dataclass
class Measured:
    """What one evaluation measured: estimates, intervals, companion spreads, and how each was made."""

    values: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)

    def update(self, other: "Measured") -> None:
        for name in ("values", "intervals", "std", "how"):
            getattr(self, name).update(getattr(other, name))


# --- images -------------------------------------------------------------------------------------
class ImageJudge:
    """The feature space and the real data, loaded once per evaluation, measuring any model's samples."""

    def __init__(self, config: PipelineConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.extractor = load_extractor(config, device)
        self.reference: RealReference = load_real_reference(config)
        self.summary = load_summary()
        self.space = extractor_description(config)

    def sample_metrics(self, model: GenerativeModel, count: int, seed: int, replicates: int,
                       what: str) -> Measured:
        """Every sample metric of ``count`` samples of ``model``; intervals from ``replicates`` bootstrap draws."""
        cfg = self.config.evaluate
        started = time.perf_counter()
        log.info("%s: drawing %d samples (%s)", what, count, model.describe_sampling())
        samples = draw_samples(model, count, cfg.batch_size, seed, f"{what}: sampling")
        log.info("%s: drew %d samples in %.1f s; measuring them%s", what, count, time.perf_counter() - started,
                 f" (and {replicates} bootstrap replicates for the intervals)" if replicates else "")
        started = time.perf_counter()
        features, probs = embed_images(self.extractor, samples, device=self.device)
        metrics = SampleMetrics(self.reference, features.numpy(), probs.numpy(), cfg.kid_subsets,
                                cfg.kid_subset_size, seed)
        values, intervals = bootstrap_intervals(metrics.compute, count, replicates, seed) if replicates else (
            metrics.compute(), {})
        log.info("%s: sample metrics measured in %.1f s", what, time.perf_counter() - started)
        measured = Measured(std={"kid": values.pop("kid_std")}, intervals=intervals)
        measured.values = values
        setting = (f"{count} samples ({model.describe_sampling()}) vs {self.reference.test.shape[0]} test images "
                   f"(FID statistics: all {self.summary['test_images']}); {self.space}; k = {cfg.k_nearest}; "
                   f"KID: {cfg.kid_subsets} subsets of {min(cfg.kid_subset_size, count)}; memorisation searches "
                   f"{self.reference.train.shape[0]} training images")
        for name in values:
            interval = f"; interval: {INTERVAL_HOW.format(replicates=replicates)}" if name in intervals else ""
            measured.how[name] = f"{get_metric(name).how}; {setting}{interval}"
        return measured


@torch.no_grad()
def likelihood_columns(model: GenerativeModel, iw_samples: int) -> dict[str, tuple[int, str]]:
    """Metric suffix -> (importance samples, what it is) of an image family's NLL: "" for an exact one,
    else the bounds or the estimate the family names (-ELBO, IWAE, AIS, ...)."""
    if model.likelihood_is_bound or model.likelihood_is_estimate:
        return model.likelihood_bounds(iw_samples)
    return {"": (1, "exact")}


def _pixels(model: GenerativeModel, seed: int) -> str:
    """Which pixels the test NLL is of."""
    if data.is_dynamically_binarized(paths.IMAGE_DATA):
        return "binarized pixels (0/255; data.images.binarize: dynamic)"
    if model.binary_pixels:
        return (f"8-bit test images binarized by the model (pixel white with probability level/255, seed {seed}): "
                "the NLL of binary images, not of 8-bit ones")
    return "8-bit discrete pixels"


def image_nll(model: GenerativeModel, config: PipelineConfig, device: torch.device) -> Measured:
    """Test NLL in nats/image and bits/dim: exact, or the bounds or estimate the family names (-ELBO, IWAE,
    AIS, ...), and for 8-bit likelihoods the headline ``nll_bits_per_dim``: the exact value, else the tightest
    bound. An estimate (``likelihood_is_estimate``) carries the standard error of ``prepare_likelihood`` as its
    spread and a +-1.96 s.e. interval, and never becomes the headline.

    The test split is copied to the device once; per-image values stay there until the mean.
    """
    test = torch.from_numpy(data.load_images(paths.IMAGE_DATA, "test")[0]).to(device)
    num_dims = model.spec.num_dims
    bounds = likelihood_columns(model, config.evaluate.iw_samples)
    pixels = _pixels(model, config.seed)
    measured = Measured()
    prepared = model.prepare_likelihood(torch.Generator(device=device).manual_seed(config.seed))
    for suffix, (k, kind) in bounds.items():
        log.info("test NLL%s: %d test images, k = %d", suffix or " (exact)", test.shape[0], k)
        started = time.perf_counter()
        batch_size = max(1, config.evaluate.batch_size // k)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        log_likelihood = torch.cat([
            model.log_likelihood(test[i:i + batch_size], importance_samples=k, generator=generator)
            for i in range(0, test.shape[0], batch_size)
        ]).double().cpu()
        nats = float(-log_likelihood.mean())
        measured.values[f"nll{suffix}_nats"] = nats
        measured.values[f"bits_per_dim{suffix}"] = nats_to_bits_per_dim(nats, num_dims)
        measured.how[f"nll{suffix}_nats"] = measured.how[f"bits_per_dim{suffix}"] = (
            f"{kind}; {test.shape[0]} test images, {pixels}, {num_dims} dims"
            + (f"; {prepared.how}" if prepared else ""))
        if prepared:
            per_dim = nats_to_bits_per_dim(1.0, num_dims)
            for key, scale in ((f"nll{suffix}_nats", 1.0), (f"bits_per_dim{suffix}", per_dim)):
                value, spread = measured.values[key], prepared.stderr_nats * scale
                measured.std[key] = spread
                measured.intervals[key] = (value - 1.96 * spread, value + 1.96 * spread)
        log.info("test NLL%s: %.2f nats/image (%.1f s)", suffix or " (exact)", nats, time.perf_counter() - started)
    if model.likelihood_is_estimate:
        return measured
    name = headline_likelihood(measured.values)
    measured.values["nll_bits_per_dim"] = measured.values[name]
    measured.how["nll_bits_per_dim"] = f"{_BITS_PER_DIM[name]} (the '{name}' column): {measured.how[name]}"
    return measured


# An image family's likelihood columns, in the order of preference when they tie: exact first.
_BITS_PER_DIM = {"bits_per_dim": "exact", "bits_per_dim_iwae": "IWAE bound", "bits_per_dim_elbo": "-ELBO bound"}


def headline_likelihood(values: dict[str, float]) -> str:
    """The column that states the family's NLL best: the exact one, else the tightest (smallest) bound.

    Every bound is an upper bound on the same quantity (-log P(x) of the same test images), so the
    smallest is the best statement the family makes about its NLL.
    """
    present = [name for name in _BITS_PER_DIM if name in values]
    if not present:
        raise ValueError(f"no bits/dim column among {sorted(values)}")
    return min(present, key=lambda name: (values[name], list(_BITS_PER_DIM).index(name)))


def evaluate_image_model(model: GenerativeModel, config: PipelineConfig, judge: ImageJudge, *, replicates: int,
                         what: str) -> tuple[Measured, Measured | None]:
    """Sample metrics of the plain draws (+ NLL); and of the configured sampling when it is not plain."""
    count, seed = config.evaluate.num_image_samples, config.sample_seed
    plain = model.plain_sampling()
    measured = judge.sample_metrics(plain or model, count, seed, replicates, what)
    configured = judge.sample_metrics(model, count, seed, replicates, f"{what} (configured)") if plain else None
    if model.has_likelihood:
        measured.update(image_nll(model, config, judge.device))
    return measured, configured


def untrained_ceiling(family: str, model: GenerativeModel, config: PipelineConfig, judge: ImageJudge) -> dict[str, float]:
    """Every sample metric of an untrained model of the same architecture (plain draws)."""
    log.info("%s: measuring the untrained ceiling (the same architecture, untrained)", family)
    seed_everything(config.seed, deterministic_on(config.performance.deterministic, judge.device))
    untrained = get_family(family).build(model.config, model.spec).to(judge.device).eval()
    measured = judge.sample_metrics(untrained.plain_sampling() or untrained, config.evaluate.num_image_samples,
                                    config.sample_seed, 0, f"{family} untrained")
    return measured.values


# --- text ---------------------------------------------------------------------------------------
def text_sample_metrics(sentences: list[list[str]], references: list[list[str]], replicates: int,
                        seed: int) -> Measured:
    """BLEU-n against ``references``, Self-BLEU-n and distinct-n of ``sentences``, with re-draw intervals.

    BLEU and Self-BLEU are means of per-sentence scores (Self-BLEU's against the whole generated set),
    so their bootstrap resamples those scores; distinct-n is recomputed on each resampled set.
    """
    measured = Measured()
    for prefix, columns in (("bleu", sentence_bleu_scores(sentences, references, max_n=4)),
                            ("self_bleu", sentence_self_bleu_scores(sentences, max_n=4))):
        for n in BLEU_ORDERS:
            value, interval = mean_with_interval(np.asarray(columns[n]), max(replicates, 1), seed)
            measured.values[f"{prefix}{n}"] = value
            if replicates:
                measured.intervals[f"{prefix}{n}"] = interval

    def distinct(index: np.ndarray | None) -> dict[str, float]:
        chosen = sentences if index is None else [sentences[i] for i in index]
        return {f"distinct{n}": distinct_n(chosen, n) for n in (1, 2)}

    values, intervals = bootstrap_intervals(distinct, len(sentences), replicates, seed) if replicates else (
        distinct(None), {})
    measured.values.update(values)
    measured.intervals.update(intervals)
    return measured


def text_nll(model: GenerativeModel, device: torch.device) -> Measured:
    """Exact test NLL per token, perplexity per token and per word (eos counted, bos not)."""
    tokenizer = data.load_tokenizer(paths.TEXT_DATA)
    test = data.load_text(paths.TEXT_DATA, "test")  # sentences of words
    encoded = data.encode_sentences(test, tokenizer, model.spec.max_len)
    on_device = encoded.to(device)  # once; the per-sentence values stay on the device until the sum
    with torch.no_grad():
        total_nats = float(-torch.cat([model.log_likelihood(on_device[i:i + 256])
                                       for i in range(0, encoded.shape[0], 256)]).double().sum())
    num_tokens, num_words = int((encoded[:, 1:] != model.spec.pad_id).sum()), count_words(test)
    how = (f"exact; total test NLL / tokens (perplexity: its exp); {len(test)} test sentences, {num_tokens} "
           f"{tokenizer.kind} tokens (eos counted once per sentence, bos not), vocabulary {len(tokenizer)}")
    per_word = (f"exact; exp(total test NLL / words): the same NLL over {num_words} words ({len(test)} test "
                f"sentences, eos counted once per sentence), words as the data step splits them for every "
                f"tokenizer, so models with different tokenizers compare; {tokenizer.kind} tokenizer")
    if tokenizer.kind == "word":
        per_word += " (unseen words are one <unk> token, which flatters word models)"
    return Measured(values={"nll_per_token": total_nats / num_tokens, "perplexity": perplexity(total_nats, num_tokens),
                            "perplexity_per_word": perplexity(total_nats, num_words)},
                    how={"nll_per_token": how, "perplexity": how, "perplexity_per_word": per_word})


def generate_sentences(model: GenerativeModel, config: PipelineConfig) -> list[list[str]]:
    """Sentences of words drawn from ``model`` (its tokens decoded, whatever the tokenizer)."""
    tokenizer = data.load_tokenizer(paths.TEXT_DATA)
    rows = draw_samples(model, config.evaluate.num_text_samples, config.evaluate.batch_size, config.sample_seed,
                        "generating sentences")
    return [tokenizer.decode(row.tolist()) for row in rows]


def evaluate_text_model(model: GenerativeModel, config: PipelineConfig, device: torch.device, *,
                        replicates: int) -> tuple[Measured, Measured | None]:
    """Sample metrics of plain draws (+ NLL); and of the configured sampling when it is not plain."""
    test = data.load_text(paths.TEXT_DATA, "test")
    count, seed = config.evaluate.num_text_samples, config.sample_seed
    plain = model.plain_sampling()
    log.info("generating %d sentences and measuring BLEU / Self-BLEU / distinct-n (%d bootstrap replicates)",
             count, replicates)
    measured = text_sample_metrics(generate_sentences(plain or model, config), test, replicates, seed)
    configured = (text_sample_metrics(generate_sentences(model, config), test, replicates, seed) if plain else None)
    setting = (f"{count} generated sentences ({model.describe_sampling()}) vs {len(test)} test sentences; "
               f"on words (the {data.load_tokenizer(paths.TEXT_DATA).kind} tokens decoded)")
    for part in filter(None, (measured, configured)):
        for name in part.values:
            interval = f"; interval: {INTERVAL_HOW.format(replicates=replicates)}" if name in part.intervals else ""
            part.how[name] = f"{get_metric(name).how}; {setting}{interval}"
    measured.update(text_nll(model, device))
    return measured, configured


def real_text_floor(config: PipelineConfig) -> dict[str, float]:
    """The text sample metrics of real validation sentences (as many as are generated) in place of samples."""
    real = data.load_text(paths.TEXT_DATA, "val")[:config.evaluate.num_text_samples]
    return text_sample_metrics(real, data.load_text(paths.TEXT_DATA, "test"), 0, config.seed).values


# --- the step -----------------------------------------------------------------------------------
def metric_values(measured: Measured, floor: dict[str, float], ceiling: dict[str, float],
                  per_seed: list[dict[str, float]]) -> dict[str, MetricValue]:
    """Assemble each declared metric's ``MetricValue``; an undeclared key is an error."""
    out = {}
    for name, value in measured.values.items():
        metric = get_metric(name)
        low, high = (metric.clip(end) for end in measured.intervals.get(name, (None, None))) \
            if name in measured.intervals else (None, None)
        result = MetricValue(value, low=low, high=high, std=measured.std.get(name),
                             floor=floor.get(name) if metric.floor else None,
                             ceiling=ceiling.get(name) if metric.ceiling else None)
        seed_values = [seed[name] for seed in per_seed if name in seed]
        if len(seed_values) > 1:
            result.seed_mean = float(np.mean(seed_values))
            result.seed_std = float(np.std(seed_values, ddof=1))
            result.seed_count = len(seed_values)
        out[name] = result
    return out


def load_seed_models(config: PipelineConfig, family: str, device: torch.device) -> list[GenerativeModel]:
    """The trained models of every training seed, the headline model first."""
    return [load_model(seed_model_dir(family, seed, config.training_seeds) / "model.pt", device)
            for seed in config.training_seeds]


def evaluate_family(config: PipelineConfig, family: str) -> Path:
    """Evaluate the trained models of ``family`` and write ``evaluation/<family>/`` and ``metrics/<family>.json``."""
    clock = StepClock(f"evaluate {family}")
    device = resolve_device(config.device)
    models = load_seed_models(config, family, device)
    model, replicates = models[0], config.evaluate.bootstrap
    log.info("%s: evaluating on %s (%d training seed(s))", family, device_name(device), len(models))
    if model.modality == "image":
        judge = ImageJudge(config, device)
        measured, configured = evaluate_image_model(model, config, judge, replicates=replicates, what=family)
        floor, ceiling = judge.summary["floor"], untrained_ceiling(family, model, config, judge)
        others = [evaluate_image_model(m, config, judge, replicates=0, what=f"{family} seed {s}")[0].values
                  for m, s in zip(models[1:], config.training_seeds[1:])]
    else:
        measured, configured = evaluate_text_model(model, config, device, replicates=replicates)
        floor, ceiling = real_text_floor(config), {}
        others = [evaluate_text_model(m, config, device, replicates=0)[0].values for m in models[1:]]
    metrics = metric_values(measured, floor, ceiling, [measured.values, *others])
    for name, value in metrics.items():
        interval = f" [{value.low:.4g}, {value.high:.4g}]" if value.low is not None else ""
        log.info("%s: %s = %.4g%s", family, name, value.value, interval)
    record = {name: value.to_json() for name, value in metrics.items()}
    if configured is not None:
        record["configured_sampling"] = {name: value.to_json()
                                         for name, value in metric_values(configured, {}, {}, []).items()}
    log.info("%s: measuring generation speed and writing sample grids", family)
    generation = generation_speed(model, config)
    with replace_directory(paths.evaluation_dir(family)) as tmp:
        write_samples(model.plain_sampling() or model, 64 if model.modality == "image" else 20, config.sample_seed,
                      tmp)
        if configured is not None:
            write_samples(model, 64 if model.modality == "image" else 20, config.sample_seed, tmp, "configured")
        atomic_write_json(tmp / "provenance.json", {
            "family": family, "modality": model.modality, "how": measured.how,
            "configured_how": configured.how if configured else None,
            "sampling": model.describe_sampling(),
            "plain_sampling": (model.plain_sampling() or model).describe_sampling(),
            "training_seeds": config.training_seeds, "sample_seed": config.sample_seed,
            "bootstrap_replicates": replicates,
            "device": device_name(device), "torch": torch.__version__,
            "genai_pipeline": package_version("genai-pipeline"), **generation, **clock.record(),
        })
    # Written last: a failure above leaves the previous metrics, and the stage unrecorded.
    atomic_write_json(paths.metrics_file(family), record)
    return paths.evaluation_dir(family)


@torch.no_grad()
def generation_speed(model: GenerativeModel, config: PipelineConfig) -> dict:
    """Samples/s of ``model.sample`` for one batch of ``evaluate.batch_size`` (after a 2-sample warm-up).

    A cost, not a metric: it goes into provenance.json, never into metrics/ (it depends on the machine).
    """
    count = config.evaluate.batch_size
    generator = torch.Generator(device=model.device).manual_seed(config.seed)
    model.sample(2, generator)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    model.sample(count, generator)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    rate = count / max(time.perf_counter() - start, 1e-9)
    return {"generation_samples_per_s": round(rate, 1),
            "generation_how": f"model.sample({count}) once after a warm-up, on {device_name(model.device)}"}

