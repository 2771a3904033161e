"""Item 2: metric speed at identical values — BLEU / Self-BLEU vs nltk, FID vs scipy sqrtm, IWAE images/s."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from benchmarks.common import Figure, interleaved, timed
from benchmarks.training import IMAGE_SPEC, synthetic_data
from genai_models.metrics import bleu, features_to_stats, fid_from_features, frechet_distance, self_bleu
from genai_models.registry import get_family
from genai_models.text import tokenize
from tasks.config import load_params

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "coco_captions"
ITEM_BLEU, ITEM_FID, ITEM_IWAE = "2a. BLEU", "2b. FID", "2c. IWAE"
ORDERS = (2, 3, 4)
_WEIGHTS = [tuple([1 / n] * n) for n in ORDERS]


def nltk_sentence_scores(hypothesis: list[str], references: list[list[str]]) -> list[float]:
    """nltk sentence_bleu of one hypothesis vs all references, method1, uniform weights, n = 2..4.

    One call with the three weight tuples (nltk >= 3.8): it counts the references once
    for all orders, so it is faster than three calls — the comparison favours nltk.
    """
    return sentence_bleu(references, hypothesis, weights=_WEIGHTS, smoothing_function=SmoothingFunction().method1)


def nltk_mean(hypotheses: list[list[str]], references_of) -> dict[int, float]:
    """Mean nltk score per order; ``references_of(i)`` gives hypothesis i's references."""
    scores = [nltk_sentence_scores(h, references_of(i)) for i, h in enumerate(hypotheses)]
    return {n: math.fsum(s[k] for s in scores) / len(scores) for k, n in enumerate(ORDERS)}


def max_abs_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[n] - b[n]) for n in ORDERS)


def load_coco(num_hypotheses: int = 5000) -> tuple[list[list[str]], list[list[str]]]:
    """The first ``num_hypotheses`` COCO train captions (the "generated" set) and the 10k test captions."""
    hyps = [tokenize(line) for line in (COCO / "image_coco.txt").read_text().splitlines()[:num_hypotheses]]
    refs = [tokenize(line) for line in (COCO / "test_coco.txt").read_text().splitlines()]
    return hyps, refs


def bleu_figures(quick: bool, hyps=None, refs=None, per_repeat: int | None = None,
                 repeats: int | None = None, self_check: int | None = None) -> list[Figure]:
    """BLEU-2..4 and Self-BLEU-2..4 of ``hyps``; nltk on a random subset, time extrapolated linearly."""
    if hyps is None:
        if not COCO.exists():
            return [Figure(ITEM_BLEU, "ours vs nltk", "x", None, status="skipped", how=f"skipped: {COCO} absent")]
        hyps, refs = load_coco()
    per_repeat = per_repeat or (8 if quick else 10)
    repeats = repeats or (3 if quick else 5)
    subset = random.Random(0).sample(range(len(hyps)), per_repeat * repeats)
    ours_s, nltk_s, nltk_values, nltk_self_values = [], [], [], []
    ours = None
    for r in range(repeats):  # interleaved: ours on everything, nltk on the next chunk of the subset
        seconds, ours = timed(lambda: (bleu(hyps, refs), self_bleu(hyps)))
        ours_s.append(seconds)
        chunk = subset[r * per_repeat:(r + 1) * per_repeat]
        seconds, (b, s) = timed(lambda: (
            [nltk_sentence_scores(hyps[i], refs) for i in chunk],
            [nltk_sentence_scores(hyps[i], hyps[:i] + hyps[i + 1:]) for i in chunk]))
        nltk_s.append(seconds * len(hyps) / len(chunk))  # linear extrapolation to all hypotheses
        nltk_values += b
        nltk_self_values += s
    # Equality on the subset: BLEU by the same function on those hypotheses; Self-BLEU per sentence.
    sub = [hyps[i] for i in subset]
    nltk_bleu = {n: math.fsum(v[k] for v in nltk_values) / len(subset) for k, n in enumerate(ORDERS)}
    nltk_self = {n: math.fsum(v[k] for v in nltk_self_values) / len(subset) for k, n in enumerate(ORDERS)}
    ours_self_sub = [bleu([hyps[i]], hyps[:i] + hyps[i + 1:]) for i in subset]
    ours_self = {n: math.fsum(v[n] for v in ours_self_sub) / len(subset) for n in ORDERS}
    diff = max(max_abs_diff(bleu(sub, refs), nltk_bleu), max_abs_diff(ours_self, nltk_self))
    # self_bleu's leave-one-out tables are checked against brute-force nltk on a small full set.
    small = hyps[:self_check or (100 if quick else 300)]
    diff_self_table = max_abs_diff(self_bleu(small), nltk_mean(small, lambda i: small[:i] + small[i + 1:]))
    setup = (f"{len(hyps)} hypotheses vs {len(refs)} references (+ Self-BLEU of the {len(hyps)}); "
             f"nltk on {per_repeat} random hypotheses per repeat, time x {len(hyps)}/{per_repeat} "
             "(linear extrapolation, not a full nltk run)")
    bleu_vals, self_vals = ours
    values = (f"ours on all: BLEU-2..4 {', '.join(f'{bleu_vals[n]:.4f}' for n in ORDERS)}; "
              f"Self-BLEU-2..4 {', '.join(f'{self_vals[n]:.4f}' for n in ORDERS)}")
    return [
        Figure.from_values(ITEM_BLEU, "ours: BLEU+Self-BLEU", "s", ours_s, f"{setup}; {values}"),
        Figure.from_values(ITEM_BLEU, "nltk (extrapolated)", "s", nltk_s, setup),
        Figure.from_values(ITEM_BLEU, "speed-up nltk / ours", "x", [n / o for n, o in zip(nltk_s, ours_s)],
                           f"per repeat: extrapolated nltk time / ours (interleaved); {setup}",
                           target=lambda x: x >= 50, target_text=">= 50"),
        Figure(ITEM_BLEU, "max abs(ours - nltk)", "", diff, diff, diff, 1, "<= 1e-6",
               "pass" if diff <= 1e-6 else "FAIL",
               f"BLEU-2..4 and per-sentence Self-BLEU-2..4 means on the {len(subset)} nltk hypotheses"),
        Figure(ITEM_BLEU, "max abs(self_bleu - nltk), small set", "", diff_self_table, diff_self_table,
               diff_self_table, 1, "<= 1e-6", "pass" if diff_self_table <= 1e-6 else "FAIL",
               f"self_bleu (leave-one-out tables) vs brute-force nltk on the first {len(small)} hypotheses"),
    ]


def correlated_features(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, dim) float32 feature sets with non-trivial, different covariances and means."""
    rng = np.random.default_rng(seed)
    latent = min(dim, 64)
    mix_a, mix_b = rng.normal(size=(latent, dim)), rng.normal(size=(latent, dim))
    a = rng.normal(size=(n, latent)) @ mix_a + 0.5 * rng.normal(size=(n, dim))
    b = rng.normal(size=(n, latent)) @ (0.8 * mix_a + 0.3 * mix_b) + 0.5 * rng.normal(size=(n, dim)) + 0.1
    return np.maximum(a, 0).astype(np.float32), np.maximum(b, 0).astype(np.float32)  # ReLU-like, as pool features


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The reference formula (pytorch-fid): np.cov statistics, scipy.linalg.sqrtm of sigma1 @ sigma2."""
    mu1, mu2 = a.mean(0, dtype=np.float64), b.mean(0, dtype=np.float64)
    return sqrtm_distance(mu1, np.cov(a, rowvar=False), mu2, np.cov(b, rowvar=False))


def sqrtm_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(s1) + Tr(s2) - 2 Tr(sqrtm(s1 s2)) with scipy.linalg.sqrtm (real part)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_figures(quick: bool, n: int = 10000, dims: tuple[int, ...] = (128, 2048), repeats: int | None = None) -> list[Figure]:
    """FID from features, ours vs scipy sqrtm, both from the raw (n, D) features, interleaved."""
    figures = []
    for dim in dims:
        a, b = correlated_features(n, dim, seed=dim)
        reps = repeats or ((7 if dim <= 512 else 2) if quick else (11 if dim <= 512 else 5))
        ours_s, ref_s, values = [], [], None
        for _ in range(reps):
            t_ours, ours = timed(lambda: fid_from_features(a, b))
            t_ref, ref = timed(lambda: scipy_fid(a, b))
            ours_s.append(t_ours)
            ref_s.append(t_ref)
            values = ours, ref
        # The distance alone, from the same statistics: where the two formulas differ.
        stats = [features_to_stats(x) for x in (a, b)]
        dist_ours, dist_ref = interleaved(lambda: frechet_distance(*stats[0], *stats[1]),
                                          lambda: sqrtm_distance(*stats[0], *stats[1]), reps)
        rel = abs(values[0] - values[1]) / abs(values[1])
        how = f"{n} x {dim} features per side (ReLU of correlated Gaussians), statistics included; " \
              f"ours {values[0]:.6g}, scipy {values[1]:.6g}"
        figures += [
            Figure.from_values(ITEM_FID, f"D={dim}: scipy / ours time", "x", [r / o for r, o in zip(ref_s, ours_s)],
                               f"{how}; ours median {np.median(ours_s):.3g} s, scipy {np.median(ref_s):.3g} s",
                               target=lambda x: x >= 1.0, target_text=">= 1 (no slower)"),
            Figure(ITEM_FID, f"D={dim}: relative difference", "", rel, rel, rel, 1, "<= 1e-4",
                   "pass" if rel <= 1e-4 else "FAIL", how),
            Figure.from_values(ITEM_FID, f"D={dim}: distance only, scipy / ours", "x",
                               [r / o for r, o in zip(dist_ref, dist_ours)],
                               f"frechet_distance vs the sqrtm formula from the same (mu, sigma); ours median "
                               f"{np.median(dist_ours):.3g} s, scipy {np.median(dist_ref):.3g} s (no target: the "
                               "target is on FID from features above)"),
        ]
    return figures


def iwae_figures(quick: bool, num_images: int | None = None, k: int | None = None) -> list[Figure]:
    """VAE importance-weighted bound: images/s at the params.yaml config, batched as tasks/evaluate.py does."""
    config = load_params("params.yaml")
    k = k or config.evaluate.iw_samples
    num_images = num_images or (40 if quick else 200)
    torch.manual_seed(0)
    model = get_family("vae").build(config.family_model_config("vae"), IMAGE_SPEC).eval()
    images = synthetic_data("image")[:num_images]
    batch_size = max(1, config.evaluate.batch_size // k)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        with torch.no_grad():
            for i in range(0, num_images, batch_size):
                model.log_likelihood(images[i:i + batch_size], importance_samples=k, generator=generator)

    run()  # warm-up
    rates = [num_images / timed(run)[0] for _ in range(3 if quick else 5)]
    return [Figure.from_values(ITEM_IWAE, f"VAE IWAE k={k}", "images/s", rates,
                               f"{num_images} images per repeat in batches of {batch_size} "
                               f"(evaluate.batch_size // k, as tasks/evaluate.py), params.yaml VAE config, "
                               f"untrained weights, fp32 CPU, {torch.get_num_threads()} threads")]
