"""Evaluation step: one trained family -> metrics (JSON), how each was made, and samples.

Images: FID against the test split (with the untrained-model ceiling beside it) and,
where the family has one, the test NLL in nats per image and bits/dim.
Text: BLEU-2..4 against the test split, Self-BLEU-2..4 (both on words, whatever the tokenizer),
test NLL per token, perplexity per token and per word.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from pathlib import Path

import torch

from genai_models.base import GenerativeModel
from genai_models.feature_extractor import extract_features
from genai_models.metrics import bleu, features_to_stats, frechet_distance, nats_to_bits_per_dim, perplexity, self_bleu
from genai_models.registry import get_family
from genai_models.text import count_words
from tasks import data, paths
from tasks.checkpoints import load_model
from tasks.config import PipelineConfig
from tasks.features import extractor_description, load_extractor, load_reference_stats
from tasks.io import atomic_write_json, replace_directory
from tasks.runtime import StepClock, device_name, resolve_device, seed_everything
from tasks.train import write_samples

log = logging.getLogger(__name__)
BLEU_ORDERS = (2, 3, 4)


def draw_samples(model: GenerativeModel, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """``count`` samples in batches from one seeded generator, on the CPU."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return torch.cat([model.sample(min(batch_size, count - i), generator).cpu() for i in range(0, count, batch_size)])


def _fid_of(extractor, images: torch.Tensor, reference: tuple, device: torch.device) -> float:
    mu, sigma = features_to_stats(extract_features(extractor, images, device=device).numpy())
    return frechet_distance(mu, sigma, *reference)


@torch.no_grad()
def image_nll(model: GenerativeModel, config: PipelineConfig, device: torch.device) -> tuple[dict, dict]:
    """Test NLL in nats/image and bits/dim: exact, or the bounds the family names (-ELBO, IWAE, ...)."""
    test = torch.from_numpy(data.load_images(paths.IMAGE_DATA, "test")[0])
    num_dims = model.spec.num_dims
    bounds = ({"": (1, "exact")} if not model.likelihood_is_bound
              else model.likelihood_bounds(config.evaluate.iw_samples))
    pixels = ("binarized pixels (0/255; data.images.binarize: dynamic)"
              if data.is_dynamically_binarized(paths.IMAGE_DATA) else "8-bit discrete pixels")
    metrics, how = {}, {}
    for suffix, (k, kind) in bounds.items():
        batch_size = max(1, config.evaluate.batch_size // k)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        log_likelihood = torch.cat([
            model.log_likelihood(test[i:i + batch_size].to(device), importance_samples=k, generator=generator).cpu()
            for i in range(0, test.shape[0], batch_size)
        ]).double()
        nats = float(-log_likelihood.mean())
        metrics[f"nll{suffix}_nats"] = nats
        metrics[f"bits_per_dim{suffix}"] = nats_to_bits_per_dim(nats, num_dims)
        how[f"nll{suffix}_nats"] = how[f"bits_per_dim{suffix}"] = (
            f"{kind}; {test.shape[0]} test images, {pixels}, {num_dims} dims")
    return metrics, how


def evaluate_images(model: GenerativeModel, family: str, config: PipelineConfig, device: torch.device) -> tuple[dict, dict]:
    """FID of samples, of an untrained copy (ceiling) and of real images (floor), plus NLL."""
    count, seed = config.evaluate.num_image_samples, config.seed
    extractor = load_extractor(config, device)
    reference = load_reference_stats()
    extractor_summary = load_reference_summary()
    samples = draw_samples(model, count, config.evaluate.batch_size, seed)
    seed_everything(seed)
    untrained = get_family(family).build(model.config, model.spec).to(device).eval()
    metrics = {
        "fid": _fid_of(extractor, samples, reference, device),
        "fid_untrained": _fid_of(extractor, draw_samples(untrained, count, config.evaluate.batch_size, seed),
                                 reference, device),
        "fid_real": extractor_summary["fid_floor"],
    }
    if "test_accuracy" in extractor_summary:
        metrics["extractor_test_accuracy"] = extractor_summary["test_accuracy"]
    fid_how = (f"{extractor_description(config)}; {count} samples vs {extractor_summary['test_images']} "
               f"test images")
    how = {"fid": fid_how, "fid_untrained": f"same model class, untrained (seed {seed}); {fid_how}",
           "fid_real": f"{extractor_summary['floor_samples']} real train images instead of samples; {fid_how}",
           "extractor_test_accuracy": "feature classifier accuracy on the test split"}
    if model.has_likelihood:
        nll, nll_how = image_nll(model, config, device)
        metrics.update(nll)
        how.update(nll_how)
    return metrics, how


def evaluate_text(model: GenerativeModel, config: PipelineConfig, device: torch.device) -> tuple[dict, dict]:
    """BLEU / Self-BLEU of generated sentences, real-text references of the same, test NLL."""
    count, seed = config.evaluate.num_text_samples, config.seed
    tokenizer = data.load_tokenizer(paths.TEXT_DATA)
    test = data.load_text(paths.TEXT_DATA, "test")  # sentences of words
    generated = [tokenizer.decode(row.tolist()) for row in draw_samples(model, count, config.evaluate.batch_size, seed)]
    real = data.load_text(paths.TEXT_DATA, "val")[:count]
    metrics: dict[str, float] = {}
    for n, value in bleu(generated, test, max_n=4).items():
        metrics[f"bleu{n}"] = value
    for n, value in self_bleu(generated, max_n=4).items():
        metrics[f"self_bleu{n}"] = value
    for n, value in bleu(real, test, max_n=4).items():
        metrics[f"bleu{n}_real"] = value
    for n, value in self_bleu(real, max_n=4).items():
        metrics[f"self_bleu{n}_real"] = value
    encoded = data.encode_sentences(test, tokenizer, model.spec.max_len)
    total_nats = float(-torch.cat([model.log_likelihood(encoded[i:i + 256].to(device)).cpu()
                                   for i in range(0, encoded.shape[0], 256)]).double().sum())
    num_tokens = int((encoded[:, 1:] != model.spec.pad_id).sum())
    num_words = count_words(test)
    metrics["nll_per_token"] = total_nats / num_tokens
    metrics["perplexity"] = perplexity(total_nats, num_tokens)
    metrics["perplexity_per_word"] = perplexity(total_nats, num_words)
    convention = "Texygen convention: mean sentence BLEU, nltk smoothing method 1, uniform weights"
    how = {f"bleu{n}": f"{count} generated sentences vs {len(test)} test sentences as references; {convention}"
           for n in BLEU_ORDERS}
    how |= {f"self_bleu{n}": f"each of {count} generated sentences vs the other {count - 1}; {convention}"
            for n in BLEU_ORDERS}
    how |= {f"bleu{n}_real": f"{len(real)} real validation sentences instead of samples" for n in BLEU_ORDERS}
    how |= {f"self_bleu{n}_real": f"{len(real)} real validation sentences instead of samples" for n in BLEU_ORDERS}
    how["nll_per_token"] = how["perplexity"] = (
        f"exact; total test NLL / tokens (perplexity: its exp); {len(test)} test sentences, {num_tokens} "
        f"{tokenizer.kind} tokens (eos counted once per sentence, bos not), vocabulary {len(tokenizer)}")
    how["perplexity_per_word"] = (
        f"exact; exp(total test NLL / words): the same NLL over {num_words} words ({len(test)} test sentences, "
        f"eos counted once per sentence), words as the data step splits them for every tokenizer, so models "
        f"with different tokenizers compare; {tokenizer.kind} tokenizer")
    if tokenizer.kind == "word":
        how["perplexity_per_word"] += " (unseen words are one <unk> token, which flatters word models)"
    for key in ("bleu", "self_bleu"):
        for n in BLEU_ORDERS:
            how[f"{key}{n}"] += f"; on words (the {tokenizer.kind} tokens decoded)"
    return metrics, how


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


def load_reference_summary() -> dict:
    return json.loads((paths.FEATURE_EXTRACTOR / "summary.json").read_text())


def evaluate_family(config: PipelineConfig, family: str) -> Path:
    """Evaluate ``models/<family>/model.pt`` and write ``evaluation/<family>/``."""
    clock = StepClock(f"evaluate {family}")
    device = resolve_device(config.device)
    model = load_model(paths.model_dir(family) / "model.pt", device)
    log.info("%s: evaluating on %s", family, device_name(device))
    if model.modality == "image":
        metrics, how = evaluate_images(model, family, config, device)
    else:
        metrics, how = evaluate_text(model, config, device)
    for name, value in metrics.items():
        log.info("%s: %s = %.4f", family, name, value)
    generation = generation_speed(model, config)
    out = paths.evaluation_dir(family)
    with replace_directory(out) as tmp:
        write_samples(model, 64 if model.modality == "image" else 20, config.seed, tmp)
        atomic_write_json(tmp / "provenance.json", {
            "family": family, "modality": model.modality, "how": {k: how[k] for k in metrics if k in how},
            "device": device_name(device), "torch": torch.__version__,
            "genai_pipeline": importlib.metadata.version("genai-pipeline"), **generation, **clock.record(),
        })
    # Written last: a failure above leaves the previous metrics, and the stage unrecorded.
    atomic_write_json(paths.metrics_file(family), {k: round(v, 6) for k, v in metrics.items()})
    return out
